"""The machinery every config dataclass uses: fields that carry their help and choices, the checks that
read them, and the fields several commands share (one definition each)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import field
from typing import Any, TypeVar

N_VOCAB = 512  # the 9-bit colour palette of the paper (section 3.2); no SOS, MASK or PAD id
DTYPES = ("auto", "bf16", "fp32")
SWITCH = ("auto", "on", "off")
OBJECTIVES = ("ar", "bert")
RESIZE_MODES = ("center", "squash")
C = TypeVar("C")
# The annotations a field's value is checked against (``check_types``), and how an error names each.
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def arg(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its CLI help text attached. ``choices`` lists the allowed values; ``type``
    gives the flag's type when the default (None) does not; ``metavar`` names its value in ``--help``;
    ``cli=False`` keeps a field off the command
    line; ``check(flag, value)`` raises on a value no command can use (``check_fields`` calls it); ``old`` is
    the flag's old name, which it also answers to for one release."""
    return field(default=default, metadata={"help": help, **kw})


def same_as(cls: type, name: str) -> Any:
    """A field defined like ``cls.name`` (default, help, choices): one concept, one definition."""
    f = cls.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_types(obj: Any, named: Callable[[str], str] = flag) -> None:
    """Each field of the dataclass ``obj`` annotated ``int``, ``float``, ``str`` or ``bool`` holds that type
    (or None, when annotated ``| None`` or None by default); an error names the field as ``named`` spells it.
    A config read from a JSON file can hold anything: ``n_layer`` 2.5 would fail deep inside the model, and
    ``int()`` would read it as 2. An integer is a number; true and false are neither. Other annotations
    (tuples, dicts, records) are their own classes' to check."""
    for f in dataclasses.fields(obj):
        kinds = str(getattr(f.type, "__name__", f.type)).replace(" ", "").split("|")
        value, kind, optional = getattr(obj, f.name), kinds[0], "None" in kinds or f.default is None
        if (value is None and optional) or len(kinds) - ("None" in kinds) != 1 or kind not in _TYPES:
            continue
        ok, what = _TYPES[kind]
        if not ok(value):
            raise ValueError(f"{named(f.name)} must be {what}{' or null' * optional}, got {value!r}")


# Field names release 0.1 wrote into config.json, run.json, fit.json and tokenizer headers, and their names
# now: a tokenizer is no longer called a palette, and the size of any fitted tokenizer is its vocab_size.
OLD_NAMES = {"palette": "tokenizer", "palette_k": "vocab_size", "codebook_size": "vocab_size",
             "loader_palette_k": "loader_vocab_size", "palette_fingerprint": "tokenizer_fingerprint"}


def with_new_names(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with each field of ``cls`` that it holds under an old name (``OLD_NAMES``) under its name now."""
    known = {f.name for f in dataclasses.fields(cls)}
    return {(OLD_NAMES[k] if k in OLD_NAMES and k not in known and OLD_NAMES[k] in known and OLD_NAMES[k] not in d
             else k): v for k, v in d.items()}


def from_json_object(cls: type[C], d: Any, *, refuse_unknown: bool = False) -> C:
    """The config ``cls`` from a JSON object of its fields (keys it does not know are dropped, or refused
    with ``refuse_unknown``); anything but an object is refused, naming what it is. A field under its old
    name (``OLD_NAMES``) reads as the field."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of {cls.__name__}'s fields, got a {type(d).__name__}")
    d = with_new_names(cls, d)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if refuse_unknown and unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    return cls(**{k: v for k, v in d.items() if k in known})


def check_fields(cfg: Any) -> None:
    """The checks every config runs first, read from its fields: each holds its annotated type
    (``check_types``), a field with ``choices`` holds one of them (None is allowed for None defaults), no
    number is NaN or infinite (they slip through ``x < 0`` checks, and no flag has a use for them), and each
    field's own ``check`` passes (seeds, devices)."""
    check_types(cfg)
    for f in dataclasses.fields(cfg):
        value, choices, name = getattr(cfg, f.name), f.metadata.get("choices"), flag(f.name)
        if choices is not None and value not in choices and not (value is None and f.default is None):
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        check: Callable[[str, Any], None] | None = f.metadata.get("check")
        if check is not None:
            check(name, value)


def require_at_least(cfg: Any, names: tuple[str, ...], low: float) -> None:
    """Raise naming the flag (``batch_size`` -> ``--batch-size``) of the first field below ``low``."""
    for name in names:
        value = getattr(cfg, name)
        if not value >= low:  # also catches NaN
            raise ValueError(f"{flag(name)} must be >= {low}, got {value}")


def require_positive(cfg: Any, names: tuple[str, ...]) -> None:
    """Raise naming the flag of the first field that is not > 0 (infinity is ``check_fields``'s to refuse)."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:  # also catches NaN
            raise ValueError(f"{flag(name)} must be > 0, got {value}")


def require_fraction(cfg: Any, name: str, *, low_open: bool = False, high_open: bool = True) -> None:
    """``name`` in [0, 1) by default; ``low_open`` excludes 0, ``high_open=False`` includes 1."""
    v = getattr(cfg, name)
    ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not (ok and math.isfinite(v)):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{flag(name)} must be in {lo}0, 1{hi}, got {v}")


# seeds reach np.random.seed and np.random.default_rng, which take only these
SEED_RANGE = (0, 2**32)


def check_seed(name: str, value: int) -> None:
    low, high = SEED_RANGE
    if not low <= value < high:
        raise ValueError(f"{name} must be in {low}..{high - 1}, got {value}")


def check_device(name: str, value: str) -> None:
    """A device this machine has: a config refuses the others when it is built, before a command writes
    anything (torch would fail only when the first tensor moves, after a run directory exists)."""
    if value == "auto":
        return
    # torch only here, for a device named: the config classes are imported by every --help, which must not
    # wait seconds for torch (a handler building a config has imported it already)
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {value!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or "
                         "'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {value!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name} {value!r}: Apple's MPS backend is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"{name} {value!r}: igpt runs on 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


# ---- shared fields: one definition each


def seed_arg(help: str) -> Any:
    return arg(0, help, check=check_seed)


def device_arg(help: str = "where to compute: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...") -> Any:
    return arg("auto", help, check=check_device)


def any_palette_arg() -> Any:
    return arg(False, "accept, for OpenAI's pre-quantized ids (which record no palette, so only their range can "
               "be checked), a palette that is not OpenAI's kmeans_centers.npy (512 colours, no fit metadata; a "
               "run's or converted checkpoint's copy of it counts as it)")


def dtype_arg() -> Any:
    return arg("auto", "autocast dtype: 'auto' (bf16 on GPUs that have it, Ampere and newer; fp32 elsewhere), "
               "'bf16' or 'fp32'", choices=DTYPES)


def resize_arg() -> Any:
    return arg("center", "how images reach n_px: 'center' (short side, then a centre crop; the paper's "
               "evaluation pipeline) or 'squash' (ignore the aspect ratio)", choices=RESIZE_MODES)


def upscale_arg() -> Any:
    return arg(False, "allow images smaller than a VQ-VAE tokenizer's input side to be enlarged (bicubic); "
               "without it they are refused, naming the file")


def val_fraction_arg() -> Any:
    return arg(0.1, "fraction of train carved out (seeded) for validation when the data has no val split")
