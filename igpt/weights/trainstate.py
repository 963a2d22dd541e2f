"""A checkpoint's training state (optimizer, data position, RNG) as safetensors plus JSON, so that reading it
back can never run code, as unpickling a ``torch.save`` file could.

The state is a tree of dicts (string keys), lists, tuples, tensors, ints, floats, bools, strings and None.
Every tensor goes to ``train_state.safetensors`` under its path in the tree (``optimizer/state/wte.weight/
exp_avg``); ``train_state.json`` holds the tree itself, with tags where JSON alone would lose the type::

    {"format_version": 1, "state": {"dict": {"step": 3, "torch_rng": {"tensor": "torch_rng"},
        "optimizer": {"dict": {"param_groups": [{"dict": {"betas": {"tuple": [0.9, 0.95]}, ...}}], ...}}}}}

Floats are written as Python's shortest repr, which reads back to the identical float (inf and nan too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from igpt.atomic import read_json, write_text
from igpt.tensorfile import require_finite
from igpt.weights.tensors import save_tensors, unreadable

FORMAT_VERSION = 1
_TAGS = ("dict", "tuple", "tensor")


def _encode(value: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (CPU, contiguous) under their '/'-joined path."""
    where = "/".join(path) or "the top level"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = "/".join(path)
        if key in tensors:
            raise ValueError(f"train state: two tensors would be stored under {key!r}")
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, path + (str(i),), tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise ValueError(f"train state: key {bad!r} at {where} is a {type(bad).__name__}; only str keys are stored")
        return {"dict": {k: _encode(v, path + (k,), tensors) for k, v in value.items()}}
    raise ValueError(f"train state: {where} is a {type(value).__module__}.{type(value).__name__}, which is not "
                     "stored (tensors, dicts, lists, tuples, numbers, strings and None are)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: Path, tensors_path: Path) -> Any:
    """The value ``_encode`` made ``node`` from; ``where`` (the JSON file) is named in errors."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where, tensors_path) for v in node]
    if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in _TAGS:
        (tag, body), = node.items()
        if tag == "tensor":
            if not isinstance(body, str) or body not in tensors:
                raise ValueError(f"{where}: names tensor {str(body)[:80]!r}, which {tensors_path.name} does not hold")
            return tensors[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(_decode(v, tensors, where, tensors_path) for v in body)
        if tag == "dict" and isinstance(body, dict):
            return {k: _decode(v, tensors, where, tensors_path) for k, v in body.items()}
    raise ValueError(f"{where}: {str(node)[:80]} is not a value of the train-state format")


def save_train_state(state: dict[str, Any], json_path: Path, tensors_path: Path) -> None:
    """Write ``state`` as the two files; the caller writes them inside a directory that is renamed into place
    whole (``igpt.atomic.replacing_dir``), so a reader sees both or neither."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), tensors)
    save_tensors(tensors, tensors_path)
    # Keys keep their order (write_json would sort them): the state reads back as the same dicts.
    write_text(json_path, json.dumps({"format_version": FORMAT_VERSION, "state": tree}, indent=1) + "\n")


def load_train_state_files(json_path: Path, tensors_path: Path) -> dict[str, Any]:
    """The state ``save_train_state`` wrote; a one-line ValueError naming the file that is missing or bad."""
    doc = read_json(json_path)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{json_path}: format_version {doc.get('format_version')!r}, this igpt reads "
                         f"{FORMAT_VERSION}")
    if not tensors_path.is_file():
        raise ValueError(f"{tensors_path} is missing: the checkpoint is incomplete")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # whatever the safetensors parser trips on, the file is unusable
        raise ValueError(f"{tensors_path} cannot be read as tensors: {unreadable(e)}") from e
    require_finite(tensors, str(tensors_path))  # NaN optimizer moments would turn the next step's weights NaN
    state = _decode(doc.get("state"), tensors, json_path, tensors_path)
    if not isinstance(state, dict):
        raise ValueError(f"{json_path}: the state is a {type(state).__name__}, not a dict")
    return state
