"""A weight file checked before it is trusted: what its tensors are, and whether their values are numbers.

Every reader of weights (``igpt.weights``, ``igpt.tokenizers``) asks three questions of a file, in this order:

1. **Which tensors, of which shapes, does it hold?** ``header_shapes`` reads them from a safetensors header
   alone, no tensor data. safetensors refuses a header whose shapes and dtypes do not account for the file's
   bytes exactly, so these shapes are bounded by the file's size.
2. **Does the config beside the tensors describe them?** ``require_fields`` compares each field a config
   declares with the value the tensors' shapes give it. A config is only a claim: ``n_layer 200000`` in
   ``config.json`` beside a two-block model would otherwise have a network of that size built (on the meta
   device, or for real) before any shape is compared. Fields read off the shapes are bounded by the file,
   so what is built after this check is too. ``require_tensors`` then compares every tensor with the model
   built from the config.
3. **Are its values finite?** ``require_finite``: a checkpoint of a run that diverged, or a damaged copy,
   holds NaN or infinities; the model would load and sample all-white images, so such a file is refused,
   naming the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

Shapes = Mapping[str, tuple[int, ...]]


def header_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the safetensors file ``path``, from its header (no tensor data is read).
    Raises safetensors' own errors for a file that is not one (the callers name the file)."""
    with safe_open(str(path), framework="pt") as f:
        return shapes_of(f)


def shapes_of(f: Any) -> dict[str, tuple[int, ...]]:
    """``header_shapes`` of a file ``safetensors.safe_open`` has open."""
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def require_fields(declared: Mapping[str, Any], stored: Mapping[str, int], config_where: str,
                   file_where: str) -> None:
    """Raise naming the first field whose declared value (``declared``, the config) differs from the value
    read off the stored tensors' shapes (``stored``: field -> value)."""
    for name, value in stored.items():
        if declared.get(name) != value:
            raise ValueError(f"{config_where}: {name} is {declared.get(name)!r}, but the tensors in {file_where} "
                             f"are those of {name} {value}")


def require_tensors(found: Shapes, expected: Shapes, where: str, shown: Callable[[str], str] = str) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: tensor {shown(missing[0])} is missing{more}")
    unexpected = sorted(k for k in found if k not in expected)
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor {shown(unexpected[0])} (shape "
                         f"{tuple(found[unexpected[0]])}); not a model of the configured shape")
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise ValueError(f"{where}: tensor {shown(k)} has shape {tuple(found[k])}, expected {tuple(shape)} "
                             "from the configuration")


def require_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise naming the first floating-point tensor that holds a NaN or an infinity (``where``: the file)."""
    for name, t in tensors.items():
        why = nonfinite(name, t)
        if why is not None:
            raise ValueError(f"{where}: {why}")


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor of ``tensors`` that holds a NaN or an infinity, or None."""
    return next((name for name, t in tensors.items() if nonfinite(name, t) is not None), None)


def nonfinite(name: str, t: torch.Tensor) -> str | None:
    """Why the tensor ``name`` is unusable when it holds a NaN or an infinity, else None. One pass over the
    tensor: ``isfinite`` makes a mask of it, a byte per value; integer and bool tensors are always finite."""
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return None
    bad = "NaN" if bool(torch.isnan(t).any()) else "infinite"
    return f"tensor {name} holds {bad} values; the weights are unusable (a run that diverged, or a damaged file)"
