"""The shape of the transformer and the presets of the released and paper models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from igpt.config.fields import N_VOCAB, arg, check_fields, from_json_object, require_at_least, require_fraction

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
    """Shape of an iGPT transformer. ``T = n_px**2`` positions, ``n_vocab`` ids of its tokenizer."""

    n_layer: int = arg(24, "number of transformer blocks")
    n_embd: int = arg(512, "width of the residual stream")
    n_head: int = arg(8, "attention heads (n_embd must be divisible by n_head)")
    n_px: int = arg(32, "side of the id grid, the sequence length being n_px**2: the image side in pixels with "
                    "a palette, the code grid's side with a VQ-VAE tokenizer (its input side / its factor)")
    # Not a flag: the tokenizer decides it (a run's tokenizer is fitted or given, and the model follows).
    n_vocab: int = arg(N_VOCAB, "tokenizer vocabulary: palette colours or VQ-VAE codes (512 in the paper)",
                       cli=False)
    dropout: float = arg(0.0, "dropout on attention weights and residual branches (the paper used none)")

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("n_layer", "n_embd", "n_head", "n_px", "n_vocab"), 1)
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
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k != "grad_checkpoint"}  # a training choice, kept here before
        return from_json_object(cls, d, refuse_unknown=True)

    def num_params(self) -> int:
        """Exact parameter count: L(12d^2 + 2d) + 2*V*d + T*d + d (sos) + d (ln_f)."""
        d, L = self.n_embd, self.n_layer
        return L * (12 * d * d + 2 * d) + 2 * self.n_vocab * d + self.n_ctx * d + 2 * d
