"""Tensor plumbing shared by every weight format: reading weight files without running code, strict
shape checks that name the tensor, and building a model that holds exactly the given tensors."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from igpt.atomic import follow_umask

from igpt.config import ModelConfig
from igpt.model import GPT


def check_tensors(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str,
                  shown: Callable[[str], str] = str) -> None:
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


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, causal: bool = True,
                where: str = "weights") -> GPT:
    """A GPT (eval mode) holding exactly these tensors, checked strictly: built on the meta device, so no
    random initialisation is paid for."""
    with torch.device("meta"):
        model = GPT(cfg, causal=causal)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors({k: tuple(v.shape) for k, v in sd.items()}, expected, where)
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
    but tensors is refused, never executed)."""
    try:
        if path.name.endswith(".safetensors"):
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the parser trips on, the answer is: this file is not usable weights
        raise ValueError(f"{path} cannot be read as weights: {unreadable(e)}") from e


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
