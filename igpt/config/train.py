"""The recipes of pretraining (with its data) and of fine-tuning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from igpt.config.fields import (OBJECTIVES, SWITCH, any_palette_arg, arg, check_fields, device_arg, dtype_arg,
                                from_json_object, require_at_least, require_fraction, require_positive, resize_arg,
                                seed_arg, upscale_arg, val_fraction_arg)


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining recipe. Defaults follow the paper (section 3.4 / appendix A) where it speaks."""

    objective: str = arg("ar", "pretraining objective: 'ar' (next pixel) or 'bert' (masked pixels)",
                         choices=OBJECTIVES)
    mask_prob: float = arg(0.15, "BERT: fraction of positions masked per image")
    batch_size: int = arg(64, "images per micro-batch")
    grad_accum: int = arg(1, "micro-batches accumulated per optimizer step")
    max_steps: int = arg(1000, "optimizer steps in total")
    lr: float = arg(1e-3, "peak learning rate")
    warmup_steps: int = arg(-1, "linear warm-up steps; -1 means one epoch of the training split (the paper)")
    min_lr_ratio: float = arg(0.0, "cosine decays to lr * this (the paper decays to 0)")
    beta1: float = arg(0.9, "Adam beta1")
    beta2: float = arg(0.95, "Adam beta2 (0.999 caused loss spikes in the paper)")
    weight_decay: float = arg(0.0, "decoupled weight decay on matrices (the paper used none)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 disables")
    grad_checkpoint: bool = arg(False, "recompute each block in the backward pass to save activation memory")
    augment: str = arg("none", "train-time augmentation: 'none'; 'cifar' (reflect-pad 4, random crop, "
                       "horizontal flip); 'imagenet' (image folders and shards of them: random short side in "
                       "[256, 384], random 224 crop, downscale; decoded in --workers processes)",
                       choices=("none", "cifar", "imagenet"))
    workers: int = arg(4, "data-loader worker processes that decode images (--augment imagenet, shards "
                       "directories); 0 = in the main process")
    eval_every: int = arg(200, "steps between validation-loss evaluations; 0 disables")
    eval_batches: int = arg(8, "validation micro-batches per evaluation; 0 = the whole split")
    log_every: int = arg(10, "steps between metric lines in metrics.jsonl (the last step is always logged)")
    tensorboard: bool = arg(False, "also log metrics (and --sample-every grids) to TensorBoard in RUN/tensorboard "
                            "(needs the tensorboard package: pip install 'igpt[tensorboard]')")
    sample_every: int = arg(0, "steps between sample grids (16 images drawn with the same seed each time, so "
                            "the grids show the model learning) written to RUN/samples/step-NNNNNNN.png; 0 "
                            "disables. BERT models fill a blank canvas by iterative infilling")
    ckpt_every: int = arg(500, "steps between checkpoints (one is always written at the end)")
    keep_last: int = arg(2, "how many step checkpoints to keep")
    keep_every: int = arg(0, "also write and keep the checkpoint of every step that is a multiple of this, exempt "
                          "from --keep-last (for igpt probe --all-checkpoints, probe accuracy against validation "
                          "loss over training); 0 = off")
    sharded_checkpoint: bool = arg(False, "write checkpoints with torch.distributed.checkpoint: each process "
                                   "saves its own shards, nothing is gathered on one rank (for --fsdp with "
                                   "large models); resumable on any number of processes")
    seed: int = seed_arg("seed for initialisation, batch order, masks and augmentation")
    device: str = device_arg()
    dtype: str = dtype_arg()
    compile: str = arg("auto", "torch.compile the model: 'auto' (on CUDA GPUs of compute capability 7.0 or "
                       "newer with triton installed; off on CPU, where compiling costs more than it saves in "
                       "short runs), 'on' or 'off'", choices=SWITCH)
    dist_timeout: float = arg(10.0, "under torchrun: minutes a collective waits for the other processes "
                              "before the run stops with an error (a dead or stuck process)")
    fsdp: bool = arg(False, "under torchrun: shard parameters, gradients and optimizer state across the "
                     "processes (FSDP2 fully_shard) instead of replicating them (DDP)")

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # run.json files of earlier versions stored a bool
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        check_fields(self)
        require_fraction(self, "mask_prob", low_open=True)
        # log_every and ckpt_every are step periods (step % every): 0 has no meaning there
        require_at_least(self, ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every", "ckpt_every"), 1)
        require_at_least(self, ("eval_every", "eval_batches", "workers", "weight_decay", "grad_clip", "sample_every",
                                "keep_every"), 0)
        require_at_least(self, ("warmup_steps",), -1)
        require_positive(self, ("lr", "dist_timeout"))
        require_fraction(self, "min_lr_ratio", high_open=False)
        for beta in ("beta1", "beta2"):  # Adam's own range, checked before a run directory is written
            require_fraction(self, beta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return from_json_object(cls, d)


# What ``pretrain --resume`` may change: how long the run goes, how often it reports and saves, and where and
# how fast it computes. The rest (the model, the data, the objective and the optimisation) is fixed for the
# life of a run. A longer --max-steps also stretches the cosine schedule from the step it resumes at.
RESUME_CHANGES = ("max_steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last", "keep_every",
                  "workers",
                  "tensorboard", "sample_every", "device", "dtype", "compile", "dist_timeout", "grad_checkpoint")


# What ``finetune --resume`` may change: where it computes. The recipe is fixed for the life of a fine-tune.
FINETUNE_RESUME_CHANGES = ("device", "dtype")


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how they become ids."""

    data: str = arg("digits", "dataset: 'digits', a .npz, an image folder, CIFAR/STL-10 directories, "
                    "OpenAI's pre-quantized prefix, shards, or a directory written by 'igpt prepare'")
    val_fraction: float = val_fraction_arg()
    resize: str = resize_arg()
    tokenizer: str | None = arg(None, "tokenizer file: a palette (.npy OpenAI layout or .npz) or a VQ-VAE "
                                "(.safetensors from 'igpt tokenizer fit'; then --n-px is its grid side); default: "
                                "fit a palette on the training pixels", type=str, old="--palette")
    vocab_size: int = arg(512, "ids of a tokenizer fitted here: a palette's colours (512 in the paper)",
                          old="--palette-k")
    any_palette: bool = any_palette_arg()
    upscale: bool = upscale_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_fraction(self, "val_fraction")
        require_at_least(self, ("vocab_size",), 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe of ``igpt finetune`` (paper section 3.4's fine-tuning paragraph)."""

    lr: float = arg(3e-4, "learning rate after warm-up, held constant (the paper's were ~10x below "
                    "pretraining's)")
    warmup_steps: int = arg(100, "linear warm-up steps")
    batch_size: int = arg(64, "labelled images per step")
    max_steps: int = arg(5000, "most optimizer steps (early stopping usually ends sooner)")
    gen_weight: float = arg(1.0, "weight of the generative loss L_GEN in L_CLF + w * L_GEN (0: L_CLF alone)")
    augment: str = arg("cifar", "'cifar' (reflect-pad 4, random crop, flip; the paper's CIFAR recipe) or "
                       "'none'", choices=("none", "cifar"))
    eval_every: int = arg(200, "steps between validation-accuracy evaluations")
    patience: int = arg(5, "stop after this many evaluations without a better validation accuracy")
    beta1: float = arg(0.9, "Adam beta1")
    beta2: float = arg(0.95, "Adam beta2")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 disables")
    mask_prob: float = arg(-1.0, "BERT checkpoints: probability that an input position is masked; -1 = the "
                           "rate the checkpoint was trained with (0.15 when it records none)")
    n_masks: int = arg(1, "BERT checkpoints: the test predictions are made under this many independent masks "
                       "and combined by a modal vote, ties broken at random (the paper used 5); 1 = one fixed mask")
    val_fraction: float = arg(0.1, "fraction of train carved out (seeded) for validation when the data has no "
                              "val split")
    labels_per_class: int = arg(0, "train on a balanced, seeded subset of this many images per class (0: all)")
    head_layer: int = arg(-1, "layer whose normed, mean-pooled features feed the head: 0..n_layer, as igpt probe "
                          "numbers them (n_layer: the final norm); -1 = the final norm. The generative loss still "
                          "reads the whole model's output (the paper's section 4.5 puts the head on a middle layer)")
    any_palette: bool = any_palette_arg()
    eval_batch_size: int = arg(256, "images per forward pass when evaluating")
    seed: int = seed_arg("seed for the head, batch order, augmentation, masks and subsets")
    device: str = device_arg()
    dtype: str = dtype_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("batch_size", "max_steps", "eval_every", "patience", "eval_batch_size", "n_masks"), 1)
        require_at_least(self, ("warmup_steps", "labels_per_class", "gen_weight", "grad_clip"), 0)
        require_at_least(self, ("head_layer",), -1)
        require_positive(self, ("lr",))
        for beta in ("beta1", "beta2"):
            require_fraction(self, beta)
        if self.mask_prob != -1:
            require_fraction(self, "mask_prob", low_open=True)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("--val-fraction must be in (0, 1): early stopping needs validation images")
