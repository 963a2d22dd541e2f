"""The benchmark commands (``igpt bench``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from igpt.config.evaluation import EvalDataConfig, SampleConfig
from igpt.config.fields import (DTYPES, N_VOCAB, SWITCH, arg, check_fields, device_arg, dtype_arg,
                                require_at_least, require_positive, same_as, seed_arg)
from igpt.config.model import PRESETS
from igpt.config.train import TrainConfig


# The shape the timed benchmarks fall back to on a machine without a GPU: igpt-s at T = 1024 would plan
# tens of GB of activations on the CPU and take minutes a step, so the defaults would not run there.
CPU_PRESET = "igpt-demo"


def preset_arg() -> Any:
    return arg("igpt-s", "model shape", choices=tuple(PRESETS))


def timed_preset_arg() -> Any:
    return arg(None, f"model shape (default: igpt-s on a GPU; {CPU_PRESET} when --device resolves to the CPU, "
               "so that a command without flags runs there in seconds)", type=str, choices=tuple(PRESETS))


def resolve_preset(preset: str | None, device_type: str) -> str:
    """The preset a timed benchmark uses: the one asked for, else igpt-s on a GPU and CPU_PRESET on the CPU."""
    if preset is not None:
        return preset
    return CPU_PRESET if device_type == "cpu" else "igpt-s"


def bench_n_px_arg() -> Any:
    return arg(None, "image side (default: the preset's)", type=int)


def require_n_px(cfg: Any) -> None:
    """None takes the preset's side; 0 must not be read as None."""
    if cfg.n_px is not None:
        require_at_least(cfg, ("n_px",), 1)


@dataclass(frozen=True)
class BenchSampleConfig:
    """``igpt bench sample``: images per second of the KV-cached sampler (and of Hugging Face's generate)."""

    preset: str | None = timed_preset_arg()
    batch_size: int = arg(256, "images sampled at once")
    n_px: int | None = bench_n_px_arg()
    n_vocab: int = arg(N_VOCAB, "tokenizer vocabulary of the random model")
    batches: int = arg(2, "timed batches of our sampler")
    warmup: int = arg(1, "untimed batches before timing")
    window: int = same_as(SampleConfig, "window")
    cuda_graph: bool | None = arg(None, "replay the one-token step as CUDA graphs (default: on CUDA)", type=bool)
    compile: str = arg("off", "torch.compile the one-token step ('auto' as pretraining decides; the first batch "
                       "then includes compiling)", choices=SWITCH)
    top_k: int = arg(0, "top-k filter for both samplers; 0 = off")
    device: str = device_arg()
    dtype: str = arg("auto", "weights and cache: 'auto' (bf16 on GPUs that have it, else fp32), 'bf16' or "
                     "'fp32'", choices=DTYPES)
    compare_hf: bool = arg(False, "also time Hugging Face's ImageGPT generate (needs transformers)")
    hf_batches: int = arg(1, "timed batches of Hugging Face's generate")
    seed: int = seed_arg("seed of the weights and draws")

    def __post_init__(self) -> None:
        check_fields(self)
        require_n_px(self)
        require_at_least(self, ("batch_size", "batches", "n_vocab", "window", "hf_batches"), 1)
        require_at_least(self, ("warmup", "top_k"), 0)


@dataclass(frozen=True)
class BenchTrainConfig:
    """``igpt bench train``: tokens/s, MFU and peak memory of training steps (and of Hugging Face's)."""

    preset: str | None = timed_preset_arg()
    batch_size: int = arg(32, "images per step; with --max-batch, where the search starts")
    n_px: int | None = bench_n_px_arg()
    n_vocab: int = arg(N_VOCAB, "tokenizer vocabulary of the random model")
    objective: str = same_as(TrainConfig, "objective")
    compile: str = arg("auto", "torch.compile our model, as igpt pretrain decides ('auto': on CUDA GPUs with "
                       "triton, off on CPU); compiling happens in the warm-up steps", choices=SWITCH)
    dtype: str = dtype_arg()
    grad_checkpoint: bool = arg(False, "recompute each block in the backward pass (activation checkpointing), "
                                "for both models")
    steps: int = arg(20, "timed training steps")
    warmup: int = arg(3, "untimed steps before timing")
    device: str = device_arg()
    compare_hf: bool = arg(False, "also train Hugging Face's ImageGPT the same way (AR only; needs transformers)")
    max_batch: bool = arg(False, "CUDA only: find the largest batch that fits (double until out of memory, then "
                          "bisect) and measure there")
    seed: int = seed_arg("seed of the weights, ids and masks")

    def __post_init__(self) -> None:
        check_fields(self)
        require_n_px(self)
        require_at_least(self, ("batch_size", "steps", "n_vocab"), 1)
        require_at_least(self, ("warmup",), 0)


@dataclass(frozen=True)
class BenchLoaderConfig:
    """``igpt bench loader``: images per second of the training input pipeline alone."""

    data: str = arg(None, "any --data igpt pretrain accepts", type=str)
    n_px: int = arg(32, "image side")
    batch_size: int = arg(64, "images per batch")
    augment: str = same_as(TrainConfig, "augment")
    workers: int = arg(0, "decoding worker processes, as igpt pretrain --workers")
    batches: int = arg(20, "timed batches")
    warmup: int = arg(2, "untimed batches first")
    device: str = device_arg("where ids are quantized: 'auto', 'cpu', 'cuda'")
    tokenizer: str | None = arg(None, "tokenizer file, a palette or a VQ-VAE (required for ids data; default: fit "
                                "a quick palette on 500 training images)", type=str, old="--palette")
    vocab_size: int = arg(N_VOCAB, "colours of the quick palette", old="--palette-k")
    seed: int = seed_arg("seed of the order and augmentation")
    any_palette: bool = same_as(EvalDataConfig, "any_palette")

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("n_px", "batch_size", "batches"), 1)
        require_at_least(self, ("warmup", "workers"), 0)
        require_at_least(self, ("vocab_size",), 2)


@dataclass(frozen=True)
class BenchMemoryConfig:
    """``igpt bench memory``: the estimated memory per GPU of a pretraining step (docs/scaling.md)."""

    preset: str = preset_arg()
    n_px: int | None = bench_n_px_arg()
    batch_size: int = arg(32, "micro-batch per GPU")
    processes: int = arg(1, "GPUs sharing the job")
    fsdp: bool = arg(False, "shard weights, gradients and Adam state (FSDP)")
    grad_checkpoint: bool = arg(False, "activation checkpointing per block")
    compiled: bool = arg(False, "torch.compile's smaller MLP activations (estimate)")
    dtype: str = arg("bf16", "autocast dtype", choices=("bf16", "fp32"))
    gpu_gb: float = arg(80.0, "memory of one GPU in GB, for the largest batch")

    def __post_init__(self) -> None:
        check_fields(self)
        require_n_px(self)
        require_at_least(self, ("batch_size", "processes"), 1)
        require_positive(self, ("gpu_gb",))


# Shares of ``igpt bench report``'s budget, one per part, in the order they run: training is timed with
# compilation (about a minute per compiled model on a GPU) and HF's eager model; sampling includes HF's
# generate, a few images per second at batch 256. The speed parts share 8 of the default 18 minutes (45%);
# the quality part gets the 10 minutes its target allows. What a part leaves unused goes to the parts after
# it; without --quality the last share is simply not spent.
REPORT_SHARES = {"train_ar": 0.155, "train_bert": 0.09, "sample": 0.155, "loader": 0.045, "quality": 0.555}


@dataclass(frozen=True)
class QualityConfig:
    """The CIFAR-10 quality protocol's model, pretraining and probe (igpt bench quality run, and the
    quality part of ``igpt bench report``); the image side is the one the ids were packed at."""

    preset: str = arg("igpt-bench", "model shape", choices=tuple(PRESETS))
    n_layer: int | None = arg(None, "override the preset's n_layer", type=int)
    n_embd: int | None = arg(None, "override the preset's n_embd", type=int)
    n_head: int | None = arg(None, "override the preset's n_head", type=int)
    batch_size: int = arg(64, "pretraining batch")
    lr: float = arg(3e-3, "peak learning rate")
    warmup_steps: int = arg(-1, "warm-up steps; -1: one epoch, capped at 10% of the steps")
    augment: str = arg("none", "pretraining augmentation", choices=("none", "cifar"))
    compile: str = arg("on", "torch.compile the model for pretraining, as pretrain --compile", choices=SWITCH)
    concat: int = arg(3, "also probe this many layers around the best")
    flip_average: bool = arg(False, "average each image's features with its mirror image's")
    max_iter: int = arg(300, "L-BFGS iterations per fit")
    eval_batch_size: int = arg(500, "images per feature pass")
    seed: int = seed_arg("seed of pretraining and of the random init")
    device: str = device_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("batch_size", "max_iter", "eval_batch_size"), 1)
        require_at_least(self, ("concat",), 0)
        require_positive(self, ("lr",))


@dataclass(frozen=True)
class BenchReportConfig:
    """``igpt bench report``: every headline figure in one process and one time budget."""

    out: str = arg(None, "output directory for report.json and report.md (refused if it holds anything, unless "
                   "--overwrite)", type=str)
    minutes: float = arg(18.0, "time budget of the whole report, compilation included; each part is capped at its "
                         "share (" + ", ".join(f"{k.replace('_', ' ')} {v * 100:g}%" for k, v in REPORT_SHARES.items())
                         + ") plus what earlier parts left, and reported as timed out past it")
    quality: str | None = arg(None, "also run the CIFAR-10 quality protocol on this ids file (written by "
                              "igpt bench quality pack) for its share of the budget and report its probe "
                              "accuracy beside random init's", type=str, metavar="IDS")
    smoke: bool = arg(False, "tiny shapes on the CPU, under two minutes: checks the harness and the report, not the "
                      "speed (the shape, batch and device flags are then ignored)")
    preset: str = arg("igpt-s", "model shape of the training and sampling rows", choices=tuple(PRESETS))
    train_batch: int = arg(32, "images per training step (AR, BERT and Hugging Face's)")
    sample_batch: int = arg(256, "images sampled at once (ours and Hugging Face's)")
    steps: int = arg(20, "timed training steps per model")
    warmup: int = arg(3, "untimed training steps first (compilation happens there)")
    data: str = arg("digits", "images for the loader row, any --data igpt pretrain accepts (digits need no "
                    "download; upscaled to the preset's side)", type=str)
    loader_vocab_size: int = arg(256, "colours of the loader's quick palette (upscaled digits hold only 256; 512 "
                                 "for photographs such as CIFAR-10)", old="--loader-palette-k")
    compile: str = arg("auto", "torch.compile our training steps, as igpt pretrain decides ('auto': on CUDA GPUs "
                       "with triton)", choices=SWITCH)
    device: str = device_arg()
    dtype: str = dtype_arg()
    seed: int = seed_arg("seed of the weights, ids, masks and draws")

    def __post_init__(self) -> None:
        check_fields(self)
        require_positive(self, ("minutes",))
        require_at_least(self, ("train_batch", "sample_batch", "steps"), 1)
        require_at_least(self, ("warmup",), 0)
        require_at_least(self, ("loader_vocab_size",), 2)
