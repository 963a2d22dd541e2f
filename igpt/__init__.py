"""igpt: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in PyTorch.

The public API: ``GPT`` (with the Hub's ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``) and its
``ModelConfig`` (``PRESETS``), the ``Palette`` and ``load_tokenizer`` (a palette or a VQ-VAE tokenizer file),
``load`` for any weights, by path or Hub id (returning the model, its tokenizer and its ``CheckpointRecord``)
and ``save``, its mirror; ``encode_images`` from image files or PIL images to ids with the training resize
(the tokenizer's ``decode_images`` goes back); ``sample`` and
``infill``; and ``pretrain``, ``resume`` and ``finetune``. The layers beneath are described in
docs/architecture.md.

Each name is imported from its module on first use (PEP 562 ``__getattr__``), not here: ``import igpt``
runs first for every ``igpt --help``, which must not wait seconds for torch, the Hub client and
torch.distributed.checkpoint. ``from igpt import load`` and ``igpt.GPT`` work as before.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_WHERE = {
    "PRESETS": "igpt.config", "DataConfig": "igpt.config", "ModelConfig": "igpt.config", "TrainConfig": "igpt.config",
    "encode_images": "igpt.data.images",
    "complete": "igpt.generate", "infill": "igpt.generate", "sample": "igpt.generate",
    "Palette": "igpt.tokenizers", "load_tokenizer": "igpt.tokenizers",
    "CheckpointRecord": "igpt.record", "Reading": "igpt.record",
    "finetune": "igpt.train", "pretrain": "igpt.train", "resume": "igpt.train",
    "GPT": "igpt.weights", "load": "igpt.weights", "save": "igpt.weights",
}

__all__ = ["GPT", "CheckpointRecord", "DataConfig", "ModelConfig", "PRESETS", "Palette", "Reading",
           "TrainConfig", "complete", "encode_images", "finetune", "infill", "load", "load_tokenizer", "pretrain",
           "resume", "sample", "save"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'igpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once: later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
