"""The tokenizer a model's ids come from: the shape of a VQ-VAE, and the recipe ``igpt tokenizer fit`` trains
it (or a palette) with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from igpt.config.fields import (N_VOCAB, arg, check_fields, device_arg, from_json_object, require_at_least,
                                require_fraction, require_positive, resize_arg, seed_arg, upscale_arg, val_fraction_arg)

TOKENIZER_KINDS = ("vqvae", "palette")


@dataclass(frozen=True)
class VQConfig:
    """Shape of a VQ-VAE tokenizer: input_side x input_side images -> a grid of (input_side / factor)^2 codes."""

    input_side: int = arg(32, "image side the VQ-VAE encodes (the paper's input resolution, IR: 192 on "
                          "ImageNet)")
    factor: int = arg(4, "downsampling from the image side to the code grid, a power of 2 (the paper: "
                      "192 -> 48, factor 4)")
    vocab_size: int = arg(N_VOCAB, "ids of the tokenizer fitted: a VQ-VAE's codebook codes, or a palette's "
                          "colours (the model's vocabulary; 512 in the paper)", old="--codebook-size")
    code_dim: int = arg(64, "width of each code vector")
    hidden: int = arg(128, "channels of the convolutional encoder and decoder")
    res_blocks: int = arg(2, "residual blocks at the grid resolution, in the encoder and in the decoder")
    decay: float = arg(0.99, "EMA decay of the codebook updates")
    commitment: float = arg(0.25, "weight of the commitment loss (encoder outputs pulled towards their codes)")
    dead_code: float = arg(2.0, "a code whose EMA usage falls below this many vectors a batch is restarted "
                           "on an encoder output of the batch; 0 disables")
    kmeans_iters: int = arg(10, "k-means iterations initialising the codebook on the first batch")

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("input_side", "factor", "vocab_size", "code_dim", "hidden"), 1)
        require_at_least(self, ("res_blocks", "dead_code", "commitment", "kmeans_iters"), 0)
        require_fraction(self, "decay")
        if self.vocab_size < 2:
            raise ValueError(f"--vocab-size must be >= 2, got {self.vocab_size}")
        if self.factor & (self.factor - 1):
            raise ValueError(f"--factor must be a power of 2, got {self.factor}")
        if self.input_side % self.factor:
            raise ValueError(f"--input-side {self.input_side} is not a multiple of --factor {self.factor}")

    @property
    def grid(self) -> int:
        return self.input_side // self.factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQConfig":
        return from_json_object(cls, d)


@dataclass(frozen=True)
class TokenizerFitConfig:
    """How ``igpt tokenizer fit`` trains: the data side of it and the optimisation of a VQ-VAE."""

    kind: str = arg("vqvae", "what to fit: 'vqvae' (a convolutional VQ-VAE, ids on a grid smaller than the "
                    "image) or 'palette' (k-means colours, one id per pixel)", choices=TOKENIZER_KINDS)
    steps: int = arg(2000, "VQ-VAE: optimizer steps in total")
    batch_size: int = arg(64, "VQ-VAE: images per step")
    lr: float = arg(3e-4, "VQ-VAE: Adam learning rate, held constant")
    eval_every: int = arg(100, "VQ-VAE: steps between validation reconstruction errors in metrics.jsonl")
    val_images: int = arg(256, "VQ-VAE: validation images each evaluation reconstructs (0 = all)")
    log_every: int = arg(10, "VQ-VAE: steps between metric lines in metrics.jsonl")
    ckpt_every: int = arg(200, "VQ-VAE: steps between checkpoints (one is always written at the end)")
    iters: int = arg(30, "palette: maximum Lloyd iterations")
    val_fraction: float = val_fraction_arg()
    resize: str = resize_arg()
    upscale: bool = upscale_arg()
    seed: int = seed_arg("seed of the initialisation, batch order, k-means and code restarts")
    device: str = device_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("steps", "batch_size", "eval_every", "log_every", "ckpt_every", "iters"), 1)
        require_at_least(self, ("val_images",), 0)
        require_positive(self, ("lr",))
        require_fraction(self, "val_fraction")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizerFitConfig":
        return from_json_object(cls, d)


# What ``tokenizer fit --resume`` may change: how long it goes, how often it reports and saves, and where.
FIT_RESUME_CHANGES = ("steps", "eval_every", "val_images", "log_every", "ckpt_every", "device")
