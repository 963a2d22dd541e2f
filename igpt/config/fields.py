"""The machinery every config dataclass uses: fields that carry their help and choices, the checks that
read them, and the fields several commands share (one definition each)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
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
