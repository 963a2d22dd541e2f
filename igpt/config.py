"""Frozen configuration dataclasses and model presets.

Every field carries its help text in ``metadata["help"]``; the CLI (``igpt.cli``) builds its flags from
these fields, so the defaults and their documentation live in exactly one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

N_VOCAB = 512  # the 9-bit colour palette of the paper (section 3.2); no SOS, MASK or PAD id


def arg(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its CLI help text attached."""
    return field(default=default, metadata={"help": help, **kw})


def require_at_least(cfg: Any, names: tuple[str, ...], low: float) -> None:
    """Raise naming the flag (``batch_size`` -> ``--batch-size``) of the first field below ``low``."""
    for name in names:
        if getattr(cfg, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")


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
    n_vocab: int = arg(N_VOCAB, "palette size (512 in the paper)")
    dropout: float = arg(0.0, "dropout on attention weights and residual branches (the paper used none)")
    grad_checkpoint: bool = arg(False, "recompute each block in the backward pass to save activation memory")

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_px", "n_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Exact parameter count: L(12d^2 + 2d) + 2*V*d + T*d + d (sos) + d (ln_f)."""
        d, L = self.n_embd, self.n_layer
        return L * (12 * d * d + 2 * d) + 2 * self.n_vocab * d + self.n_ctx * d + 2 * d


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining recipe. Defaults follow the paper (section 3.4 / appendix A) where it speaks."""

    objective: str = arg("ar", "pretraining objective: 'ar' (next pixel) or 'bert' (masked pixels)",
                         choices=("ar", "bert"))
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
    augment: str = arg("none", "train-time augmentation: 'none'; 'cifar' (reflect-pad 4, random crop, "
                       "horizontal flip); 'imagenet' (image folders only: random short side in [256, 384], "
                       "random 224 crop, downscale; decoded in --workers processes)",
                       choices=("none", "cifar", "imagenet"))
    workers: int = arg(4, "data-loader worker processes that decode images (--augment imagenet, shards "
                       "directories); 0 = in the main process")
    eval_every: int = arg(200, "steps between validation-loss evaluations; 0 disables")
    eval_batches: int = arg(8, "validation micro-batches per evaluation")
    log_every: int = arg(10, "steps between metric lines in metrics.jsonl")
    tensorboard: bool = arg(False, "also log metrics to TensorBoard in RUN/tensorboard (needs tensorboard)")
    ckpt_every: int = arg(500, "steps between checkpoints (one is always written at the end)")
    keep_last: int = arg(2, "how many step checkpoints to keep")
    sharded_checkpoint: bool = arg(False, "write checkpoints with torch.distributed.checkpoint: each process "
                                   "saves its own shards, nothing is gathered on one rank (for --fsdp with "
                                   "large models); resumable on any number of processes")
    seed: int = arg(0, "seed for initialisation, batch order, masks and augmentation")
    device: str = arg("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = arg("auto", "autocast dtype: 'auto' (bf16 on GPUs that have it, Ampere and newer; fp32 "
                     "elsewhere), 'bf16' or 'fp32'",
                     choices=("auto", "bf16", "fp32"))
    compile: str = arg("auto", "torch.compile the model: 'auto' (on CUDA GPUs of compute capability 7.0 or "
                       "newer with triton installed; off on CPU, where compiling costs more than it saves in "
                       "short runs), 'on' or 'off'", choices=("auto", "on", "off"))
    dist_timeout: float = arg(10.0, "under torchrun: minutes a collective waits for the other processes "
                              "before the run stops with an error (a dead or stuck process)")
    fsdp: bool = arg(False, "under torchrun: shard parameters, gradients and optimizer state across the "
                     "processes (FSDP2 fully_shard) instead of replicating them (DDP)")

    def __post_init__(self) -> None:
        if self.objective not in ("ar", "bert"):
            raise ValueError(f"--objective must be 'ar' or 'bert', got {self.objective!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        require_at_least(self, ("batch_size", "grad_accum", "max_steps", "keep_last"), 1)
        require_at_least(self, ("eval_every", "eval_batches", "log_every", "ckpt_every"), 0)
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < -1:
            raise ValueError(f"--warmup-steps must be >= -1, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.augment not in ("none", "cifar", "imagenet"):
            raise ValueError(f"--augment must be 'none', 'cifar' or 'imagenet', got {self.augment!r}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if isinstance(self.compile, bool):  # run.json files of earlier versions stored a bool
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"--compile must be 'auto', 'on' or 'off', got {self.compile!r}")
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be > 0 minutes, got {self.dist_timeout}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how they become ids."""

    data: str = arg("digits", "dataset: 'digits', a .npz, an image folder, CIFAR/STL-10 directories, "
                    "OpenAI's pre-quantized prefix, or a directory written by 'igpt prepare'")
    val_fraction: float = arg(0.1, "fraction of train carved out (seeded) for validation when the source "
                              "has no validation split")
    resize: str = arg("center", "how images reach n_px: 'center' (short side, centre crop) or 'squash'",
                      choices=("center", "squash"))
    palette: str | None = arg(None, "palette file (.npy OpenAI layout or .npz); default: fit one on the "
                              "training pixels")
    palette_k: int = arg(512, "colours of a palette fitted here (512 in the paper)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.resize not in ("center", "squash"):
            raise ValueError(f"--resize must be 'center' or 'squash', got {self.resize!r}")
        if self.palette_k < 2:
            raise ValueError(f"--palette-k must be >= 2, got {self.palette_k}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
