"""Frozen configuration dataclasses, their presets, and every flag the command line has.

Each field carries its help text (and, where it has them, its choices) in ``metadata``; ``igpt.cli.args``
turns the fields into flags, so a default, its help and its choices are written once, here. Choices are
checked once, from that metadata, by ``check_choices``; ranges by each class's ``__post_init__``. Fields
that several commands share (the device, the autocast dtype, the resize mode) come from one factory each.
Dataclasses of the benchmark commands live in ``igpt.config_bench``, which builds on this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

N_VOCAB = 512  # the 9-bit colour palette of the paper (section 3.2); no SOS, MASK or PAD id
DTYPES = ("auto", "bf16", "fp32")
SWITCH = ("auto", "on", "off")
OBJECTIVES = ("ar", "bert")
RESIZE_MODES = ("center", "squash")


def arg(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its CLI help text attached. ``choices`` lists the allowed values; ``type``
    gives the flag's type when the default (None) does not; ``cli=False`` keeps a field off the command
    line."""
    return field(default=default, metadata={"help": help, **kw})


def same_as(cls: type, name: str) -> Any:
    """A field defined like ``cls.name`` (default, help, choices): one concept, one definition."""
    f = cls.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_choices(cfg: Any) -> None:
    """Every field with ``choices`` in its metadata holds one of them (None is allowed for None defaults)."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices is not None and value not in choices and not (value is None and f.default is None):
            raise ValueError(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}; got {value!r}")


def require_at_least(cfg: Any, names: tuple[str, ...], low: float) -> None:
    """Raise naming the flag (``batch_size`` -> ``--batch-size``) of the first field below ``low``."""
    for name in names:
        value = getattr(cfg, name)
        if not value >= low:  # also catches NaN
            raise ValueError(f"{flag(name)} must be >= {low}, got {value}")


def require_fraction(cfg: Any, name: str, *, low_open: bool = False, high_open: bool = True) -> None:
    """``name`` in [0, 1) by default; ``low_open`` excludes 0, ``high_open=False`` includes 1."""
    v = getattr(cfg, name)
    ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not (ok and math.isfinite(v)):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{flag(name)} must be in {lo}0, 1{hi}, got {v}")


# ---- shared fields: one definition each


def device_arg() -> Any:
    return arg("auto", "where to compute: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")


def dtype_arg() -> Any:
    return arg("auto", "autocast dtype: 'auto' (bf16 on GPUs that have it, Ampere and newer; fp32 elsewhere), "
               "'bf16' or 'fp32'", choices=DTYPES)


def resize_arg() -> Any:
    return arg("center", "how images reach n_px: 'center' (short side, then a centre crop; the paper's "
               "evaluation pipeline) or 'squash' (ignore the aspect ratio)", choices=RESIZE_MODES)


def val_fraction_arg() -> Any:
    return arg(0.1, "fraction of train carved out (seeded) for validation when the data has no val split")


# ---- the model

# Shapes of the released and paper models (reference igpt.md section 13) plus small ones for tests and
# the demo. iGPT-XL's head count is unpublished; 24 heads (head_dim 128) is our choice, not OpenAI's.
PRESETS: dict[str, dict[str, int]] = {
    "igpt-s": dict(n_layer=24, n_embd=512, n_head=8, n_px=32),
    "igpt-m": dict(n_layer=36, n_embd=1024, n_head=8, n_px=32),
    "igpt-l": dict(n_layer=48, n_embd=1536, n_head=16, n_px=32),
    "igpt-xl": dict(n_layer=60, n_embd=3072, n_head=24, n_px=64),
    # 8-layer, 512-wide at 32x32: the shape the CIFAR-10 quality benchmark uses on one GPU.
    "igpt-bench": dict(n_layer=8, n_embd=512, n_head=8, n_px=32),
    # 4 layers at 8x8 (scikit-learn digits): trains in about a minute on two CPU cores.
    "igpt-demo": dict(n_layer=4, n_embd=128, n_head=4, n_px=8),
    # the smallest sensible model, for unit tests.
    "igpt-nano": dict(n_layer=2, n_embd=32, n_head=2, n_px=8),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an iGPT transformer. ``T = n_px**2`` positions, ``n_vocab`` palette ids."""

    n_layer: int = arg(24, "number of transformer blocks")
    n_embd: int = arg(512, "width of the residual stream")
    n_head: int = arg(8, "attention heads (n_embd must be divisible by n_head)")
    n_px: int = arg(32, "image side in pixels; the sequence length is n_px**2")
    # Not a flag: the palette decides it (a run's palette is fitted or given, and the model follows).
    n_vocab: int = arg(N_VOCAB, "palette size (512 in the paper)", cli=False)
    dropout: float = arg(0.0, "dropout on attention weights and residual branches (the paper used none)")

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_px", "n_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        require_fraction(self, "dropout")

    @property
    def n_ctx(self) -> int:
        return self.n_px * self.n_px

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k != "grad_checkpoint"}  # a training choice, kept here before
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Exact parameter count: L(12d^2 + 2d) + 2*V*d + T*d + d (sos) + d (ln_f)."""
        d, L = self.n_embd, self.n_layer
        return L * (12 * d * d + 2 * d) + 2 * self.n_vocab * d + self.n_ctx * d + 2 * d


# ---- pretraining


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
    log_every: int = arg(10, "steps between metric lines in metrics.jsonl")
    tensorboard: bool = arg(False, "also log metrics to TensorBoard in RUN/tensorboard (needs tensorboard)")
    ckpt_every: int = arg(500, "steps between checkpoints (one is always written at the end)")
    keep_last: int = arg(2, "how many step checkpoints to keep")
    sharded_checkpoint: bool = arg(False, "write checkpoints with torch.distributed.checkpoint: each process "
                                   "saves its own shards, nothing is gathered on one rank (for --fsdp with "
                                   "large models); resumable on any number of processes")
    seed: int = arg(0, "seed for initialisation, batch order, masks and augmentation")
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
        check_choices(self)
        require_fraction(self, "mask_prob", low_open=True)
        require_at_least(self, ("batch_size", "grad_accum", "max_steps", "keep_last"), 1)
        require_at_least(self, ("eval_every", "eval_batches", "log_every", "ckpt_every", "workers"), 0)
        require_at_least(self, ("warmup_steps",), -1)
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        require_fraction(self, "min_lr_ratio", high_open=False)
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 minutes, got {self.dist_timeout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how they become ids."""

    data: str = arg("digits", "dataset: 'digits', a .npz, an image folder, CIFAR/STL-10 directories, "
                    "OpenAI's pre-quantized prefix, shards, or a directory written by 'igpt prepare'")
    val_fraction: float = val_fraction_arg()
    resize: str = resize_arg()
    palette: str | None = arg(None, "palette file (.npy OpenAI layout or .npz); default: fit one on the "
                              "training pixels", type=str)
    palette_k: int = arg(512, "colours of a palette fitted here (512 in the paper)")

    def __post_init__(self) -> None:
        check_choices(self)
        require_fraction(self, "val_fraction")
        require_at_least(self, ("palette_k",), 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- generation and evaluation


@dataclass(frozen=True)
class SampleConfig:
    """How ids are drawn, shared by ``igpt sample`` and ``igpt complete``."""

    temperature: float = arg(1.0, "softmax temperature; 0 is the greedy argmax (the paper sampled at 1)")
    top_k: int = arg(0, "draw only from the k most likely ids at each step; 0 = no top-k filter")
    top_p: float = arg(1.0, "nucleus: draw only from the smallest set of ids whose probability reaches p; "
                       "1 = no nucleus filter")
    seed: int = arg(0, "seed of the draws (results also depend on the device and --batch-size)")
    batch_size: int = arg(64, "images sampled at once")
    device: str = device_arg()
    dtype: str = arg("auto", "weights and KV cache: 'auto' (bf16 on GPUs that have it, fp32 elsewhere), "
                     "'bf16' or 'fp32'", choices=DTYPES)
    window: int = arg(64, "the one-token step attends the cache in multiples of this many slots (static "
                      "shapes; one CUDA graph per multiple); 1 = exactly the filled slots")
    cuda_graph: bool = arg(True, "on CUDA, replay the one-token step as CUDA graphs (no effect on the CPU)")
    compile: str = arg("off", "torch.compile the one-token step, fusing its small kernels: 'on', 'off', or "
                       "'auto' (on where pretraining's auto would compile); compiling takes a minute or more, "
                       "so it pays off only for long jobs", choices=SWITCH)

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        check_choices(self)
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        require_at_least(self, ("top_k",), 0)
        require_fraction(self, "top_p", low_open=True, high_open=False)
        require_at_least(self, ("batch_size", "window"), 1)

    def filters(self) -> dict[str, float | int | None]:
        """Keyword arguments of ``sample``/``infill``: the CLI's 0 and 1 mean 'off', the API's None."""
        return {"temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": None if self.top_p >= 1.0 else self.top_p}


@dataclass(frozen=True)
class EvalDataConfig:
    """The split of ``--data`` that ``score`` and ``complete`` read."""

    data: str | None = arg(None, "dataset (any format 'igpt prepare' reads, or a prepared cache); an ids cache "
                           "must come from the checkpoint's palette", type=str)
    split: str | None = arg(None, "split to use (default: test when present, else val)", type=str,
                            choices=("train", "val", "test", "unlabeled", "train_all"))
    val_fraction: float = arg(0.1, "val carved from train when the source has none; match the run's")
    split_seed: int = arg(0, "seed of that carve; match the run's --seed")
    resize: str = resize_arg()

    def __post_init__(self) -> None:
        check_choices(self)
        require_fraction(self, "val_fraction")


@dataclass(frozen=True)
class ScoreConfig:
    """``igpt score``: the mean NLL of a split."""

    batch_size: int = arg(64, "images per forward pass")
    mask_prob: float = arg(-1.0, "BERT: fraction of positions masked; -1 = the rate the checkpoint was "
                           "trained with (0.15 when it records none)")
    seed: int = arg(0, "BERT: seed of the masks")
    device: str = device_arg()
    dtype: str = dtype_arg()

    def __post_init__(self) -> None:
        check_choices(self)
        require_at_least(self, ("batch_size",), 1)
        if self.mask_prob != -1:
            require_fraction(self, "mask_prob", low_open=True)


@dataclass(frozen=True)
class FeatureConfig:
    """How features are read out of a model (``igpt probe``)."""

    batch_size: int = arg(256, "images per forward pass when extracting features")
    device: str = device_arg()
    dtype: str = dtype_arg()
    bert_mask: bool = arg(True, "BERT checkpoints: mask the inputs as in training when extracting features "
                          "(the paper does); --no-bert-mask reads them unmasked")
    mask_prob: float = arg(-1.0, "BERT: probability that a position is masked; -1 = the rate the checkpoint "
                           "was trained with (0.15 when it records none)")
    n_masks: int = arg(1, "BERT: average the features over this many independent masks (the paper "
                       "ensembled 5, by a vote of predictions)")
    flip_average: bool = arg(False, "average each image's features with those of its mirror image "
                             "(test-time augmentation; not in the paper)")
    mask_seed: int = arg(0, "seed of the BERT masks")
    cache: bool = arg(True, "reuse features cached in --out by an earlier run with identical inputs")

    def __post_init__(self) -> None:
        check_choices(self)
        require_at_least(self, ("batch_size", "n_masks"), 1)
        if self.mask_prob != -1:
            require_fraction(self, "mask_prob", low_open=True)


DEFAULT_L2_GRID = "1e-6,3e-6,1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1"


@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe of ``igpt probe``."""

    l2_grid: str = arg(DEFAULT_L2_GRID, "comma-separated L2 strengths searched on the validation carve")
    l2: float = arg(-1.0, "a fixed L2 strength (no search); -1 searches --l2-grid")
    val_fraction: float = arg(0.1, "fraction of each class of train carved out (seeded) to choose the L2 "
                              "strength and the best layer")
    max_iter: int = arg(500, "L-BFGS iterations per fit")
    seed: int = arg(0, "seed of the validation carve and of the low-data subsets")
    concat: int = arg(0, "also probe the concatenation of this many layers centred on the best one "
                      "(0 or 1: off; the paper used 5 for ImageNet)")
    labels_per_class: int = arg(0, "low-data protocol: fit on this many labelled images per class (0: all of "
                                "train)")
    repeats: int = arg(5, "low-data protocol: how many random subsets; mean +- std is reported")
    eval_subset: str = arg("all", "test images scored: 'all', or 'lossless' (the bit-exact images marked by "
                           "test_lossless in cifar10.npz; 'all' is reported too)", choices=("all", "lossless"))

    def __post_init__(self) -> None:
        check_choices(self)
        self.grid  # noqa: B018 -- parses and validates the grid
        if self.l2 < 0 and self.l2 != -1:
            raise ValueError(f"--l2 must be >= 0, or -1 to search --l2-grid; got {self.l2}")
        require_fraction(self, "val_fraction")
        require_at_least(self, ("max_iter", "repeats"), 1)
        require_at_least(self, ("concat", "labels_per_class"), 0)

    @property
    def grid(self) -> tuple[float, ...]:
        if self.l2 >= 0:
            return (self.l2,)
        try:
            values = tuple(float(v) for v in self.l2_grid.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--l2-grid must be comma-separated numbers, got {self.l2_grid!r}") from None
        if not values or min(values) < 0 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"--l2-grid must hold finite strengths >= 0, got {self.l2_grid!r}")
        return values


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
    val_fraction: float = arg(0.1, "fraction of train carved out (seeded) for validation when the data has no "
                              "val split")
    labels_per_class: int = arg(0, "train on a balanced, seeded subset of this many images per class (0: all)")
    eval_batch_size: int = arg(256, "images per forward pass when evaluating")
    seed: int = arg(0, "seed for the head, batch order, augmentation, masks and subsets")
    device: str = device_arg()
    dtype: str = dtype_arg()

    def __post_init__(self) -> None:
        check_choices(self)
        require_at_least(self, ("batch_size", "max_steps", "eval_every", "patience", "eval_batch_size"), 1)
        require_at_least(self, ("warmup_steps", "labels_per_class", "gen_weight", "grad_clip"), 0)
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.mask_prob != -1:
            require_fraction(self, "mask_prob", low_open=True)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("--val-fraction must be in (0, 1): early stopping needs validation images")


# ---- benchmarks (``igpt bench``)


def preset_arg() -> Any:
    return arg("igpt-s", "model shape", choices=tuple(PRESETS))


def bench_n_px_arg() -> Any:
    return arg(None, "image side (default: the preset's)", type=int)


@dataclass(frozen=True)
class BenchSampleConfig:
    """``igpt bench sample``: images per second of the KV-cached sampler (and of Hugging Face's generate)."""

    preset: str = preset_arg()
    batch_size: int = arg(256, "images sampled at once")
    n_px: int | None = bench_n_px_arg()
    n_vocab: int = arg(N_VOCAB, "palette size of the random model")
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
    seed: int = arg(0, "seed of the weights and draws")

    def __post_init__(self) -> None:
        check_choices(self)
        require_at_least(self, ("batch_size", "batches", "n_vocab", "window", "hf_batches"), 1)
        require_at_least(self, ("warmup", "top_k"), 0)


@dataclass(frozen=True)
class BenchTrainConfig:
    """``igpt bench train``: tokens/s, MFU and peak memory of training steps (and of Hugging Face's)."""

    preset: str = preset_arg()
    batch_size: int = arg(32, "images per step; with --max-batch, where the search starts")
    n_px: int | None = bench_n_px_arg()
    n_vocab: int = arg(N_VOCAB, "palette size of the random model")
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
    seed: int = arg(0, "seed of the weights, ids and masks")

    def __post_init__(self) -> None:
        check_choices(self)
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
    device: str = arg("auto", "where ids are quantized: 'auto', 'cpu', 'cuda'")
    palette: str | None = arg(None, "palette file (required for ids data; default: fit a quick one on 500 "
                              "training images)", type=str)
    palette_k: int = arg(N_VOCAB, "colours of the quick palette")
    seed: int = arg(0, "seed of the order and augmentation")

    def __post_init__(self) -> None:
        check_choices(self)
        require_at_least(self, ("n_px", "batch_size", "batches"), 1)
        require_at_least(self, ("warmup", "workers"), 0)
        require_at_least(self, ("palette_k",), 2)


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
        check_choices(self)
        require_at_least(self, ("batch_size", "processes"), 1)
        if not self.gpu_gb > 0:
            raise ValueError(f"--gpu-gb must be > 0, got {self.gpu_gb}")
