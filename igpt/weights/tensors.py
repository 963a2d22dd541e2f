"""Tensor plumbing shared by every weight format: reading weight files without running code (their shapes
first, from the header, then their values, which must be finite), the fields of a GPT's config its tensors'
shapes give, and building a model that holds exactly the given tensors, checked strictly."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from igpt.atomic import follow_umask
from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.tensorfile import header_shapes, require_finite, require_tensors


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weight file, before its data is read: a safetensors file's header, or a
    PyTorch ``.bin`` mapped into memory with ``weights_only`` (its storages are not read)."""
    try:
        if path.name.endswith(".safetensors"):
            return header_shapes(path)
        loaded = _torch_load(path, mmap=True)
    except Exception as e:  # whatever the parser trips on, the answer is: this file is not usable weights
        raise ValueError(f"{path} cannot be read as weights: {unreadable(e)}") from e
    return {k: tuple(v.shape) for k, v in _state(loaded, path).items()}


def gpt_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """What the shapes of a GPT's tensors (``igpt.model.GPT``'s names) say of its ModelConfig: ``n_layer``
    (the blocks present), ``n_embd`` and ``n_vocab`` (wte: (V, d)) and ``n_px`` (wpe: (n_px**2, d)). A field
    whose tensor is missing or of another rank is left out: the strict check names that tensor."""
    out = {"n_layer": len({k.split(".")[1] for k in shapes if k.startswith("blocks.") and k.count(".") > 1})}
    wte, wpe = shapes.get("wte.weight", ()), shapes.get("wpe.weight", ())
    if len(wte) == 2:
        out["n_vocab"], out["n_embd"] = wte
    if len(wpe) == 2 and wpe[0] >= 0 and math.isqrt(wpe[0]) ** 2 == wpe[0]:
        out["n_px"] = math.isqrt(wpe[0])
    return out


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, causal: bool = True,
                where: str = "weights") -> GPT:
    """A GPT (eval mode) holding exactly these tensors, checked strictly: built on the meta device, so no
    random initialisation is paid for."""
    with torch.device("meta"):
        model = GPT(cfg, causal=causal)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    require_tensors({k: tuple(v.shape) for k, v in sd.items()}, expected, where)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def unreadable(e: BaseException) -> str:
    """Why a file could not be read, in one line. For a pickle that torch's restricted loader refused: what
    it asked for (torch's own message goes on to suggest loading the file unrestricted, which would run it)."""
    text = str(e).strip()
    if isinstance(e, EOFError):
        return "it ends early: the file is truncated"
    if "Weights only load failed" in text:
        name, op = re.search(r"GLOBAL ([\w.]+)", text), re.search(r"Unsupported operand (\d+)", text)
        what = (f"needs {name.group(1)}" if name else f"uses pickle opcode {op.group(1)}" if op
                else "needs more than tensors and plain values")
        return f"it holds a pickle that {what}: refused, nothing in it was run"
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a PyTorch ``.bin`` read with ``weights_only`` (a pickle that needs anything
    but tensors is refused, never executed). A tensor holding NaN or infinities is an error naming it."""
    try:
        loaded = load_file(str(path)) if path.name.endswith(".safetensors") else _torch_load(path)
    except Exception as e:  # whatever the parser trips on, the answer is: this file is not usable weights
        raise ValueError(f"{path} cannot be read as weights: {unreadable(e)}") from e
    tensors = _state(loaded, path)
    require_finite(tensors, str(path))
    return tensors


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only``; ``mmap`` maps the storages instead of reading them, which
    only the zip format (torch >= 1.6) allows: an older file is read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):
            return torch.load(path, map_location="cpu", weights_only=True)
        raise


def _state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of named tensors")
    return obj


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file with the mode any other output gets (safetensors creates its files 0600, which
    teammates reading a run on a shared filesystem could not open)."""
    save_file(tensors, str(path), metadata=metadata)
    follow_umask(path)


def nbytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (of a DTensor, this process's shard): what
    writing them needs on disk."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0
