"""The one front door for weights: ``load`` reads every format igpt knows, and the converters write them.

``load(path)`` accepts an igpt checkpoint directory (full or sharded), a run directory (its newest
checkpoint) or a Hugging Face ImageGPT folder (``model.safetensors`` or ``pytorch_model.bin``, sharded or
not), and returns the model, its palette and its ``CheckpointRecord``. The model is in eval mode and reads
ids the way its weights were trained (``record.reading``): a BERT checkpoint's ``model(ids)`` is the
bidirectional forward. OpenAI's TensorFlow checkpoints are converted once with ``convert_openai``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch

from igpt.atomic import require_new
from igpt.model import GPT
from igpt.palette import Palette
from igpt.record import CheckpointRecord
from igpt.weights.checkpoint import load_head, load_igpt, resolve_checkpoint, save_checkpoint
from igpt.weights.hf import is_hf_dir, load_hf, save_hf
from igpt.weights.openai import load_openai

log = logging.getLogger(__name__)
T = TypeVar("T")
_PRUNE_PATIENCE = 60.0  # seconds a reader keeps choosing again while a run prunes under it
_LISTING_RETRIES = 20


class Loaded(NamedTuple):
    model: GPT
    palette: Palette
    record: CheckpointRecord


def locate(path: str | Path) -> Path:
    """The directory ``load(path)`` reads: a Hugging Face folder, a checkpoint, or a run's newest checkpoint."""
    src = Path(path)
    return src if is_hf_dir(src) else resolve_checkpoint(src)


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """``igpt.load``: (model, palette, record) from any weights igpt reads (see the module docstring)."""
    return load_located(path, device)[1]


def load_located(path: str | Path, device: str | torch.device = "cpu") -> tuple[Path, Loaded]:
    """``load``, and the directory it read (for a run directory: the checkpoint that was newest then)."""
    def read(src: Path) -> tuple[Path, Loaded]:
        return src, Loaded(*(load_hf(src, device) if is_hf_dir(src) else load_igpt(src, device)))
    return _newest(path, read)


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPT, torch.nn.Linear, Palette, CheckpointRecord]:
    """A fine-tuned checkpoint (or its run directory): (model, head, palette, record). The head maps the mean
    over positions of the final norm's output, (B, d), to class logits (B, n_classes)."""
    def read(ckpt_dir: Path) -> tuple[GPT, torch.nn.Linear, Palette, CheckpointRecord]:
        model, palette, record = load_igpt(ckpt_dir, device)
        return model, load_head(ckpt_dir, record, device), palette, record
    return _newest(path, read)


def _newest(path: str | Path, read: Callable[[Path], T]) -> T:
    """``read`` the directory ``path`` names. A run that is training prunes old checkpoints as it writes new
    ones, so the one chosen may vanish before it is read (and a listing taken while checkpoints are renamed
    may miss them all): then the run's newest is chosen again, for as long as the run keeps winning the race
    (``_PRUNE_PATIENCE`` seconds, far more than one checkpoint interval)."""
    path = Path(path)
    deadline, misses = time.monotonic() + _PRUNE_PATIENCE, 0
    while True:
        try:
            src = locate(path)
        except ValueError:
            misses += 1  # a listing that raced renames misses entries; a few more show whether any are there
            if misses > _LISTING_RETRIES or not (path / "checkpoints").is_dir():
                raise
            time.sleep(0.01)
            continue
        try:
            return read(src)
        except Exception:
            if src == path or src.exists() or time.monotonic() > deadline:
                raise  # a broken checkpoint, not a pruned one
            log.info("%s was pruned while being read; reading the run's newest checkpoint again", src)


def convert_hf(src: str | Path, out: str | Path) -> Path:
    """A Hugging Face ImageGPT folder as an igpt checkpoint."""
    require_new(out)
    model, palette, record = load_hf(src)
    return save_checkpoint(out, model, palette, record)


def convert_openai(prefix: str | Path, out: str | Path, palette: str | Path | None = None,
                   objective: str | None = None) -> Path:
    """A released TensorFlow checkpoint (prefix ``.../model.ckpt-N``) as an igpt checkpoint."""
    require_new(out)
    model, pal, record = load_openai(prefix, palette, objective, progress=True)
    return save_checkpoint(out, model, pal, record)


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """An igpt checkpoint (AR) as a Hugging Face ImageGPT folder; a fine-tuned checkpoint's trunk only."""
    require_new(out)
    model, palette, record = load(ckpt)
    if record.finetuned is not None:
        log.info("exporting the fine-tuned trunk as a generative model; its classifier head is not exported")
    return save_hf(model, palette, out, record)


def consolidate(src: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint (or the newest one of a run) as a single-file checkpoint: model.safetensors,
    config.json and palette.npz, read by ``igpt.load`` anywhere. Done in one process, which needs the full
    weights in memory (not the optimizer state: the result is for inference, fine-tuning and export; the
    sharded checkpoint itself stays the one to resume training from)."""
    require_new(out)
    ckpt_dir = locate(src)
    model, palette, record = load(ckpt_dir)
    if not record.sharded:
        raise ValueError(f"{ckpt_dir} is not a sharded checkpoint (its config.json does not declare one); it "
                         "is already a single-file checkpoint")
    single = record.replace(sharded=False, saved_by_processes=1,
                            source={"format": "igpt-sharded", "path": str(ckpt_dir)})
    return save_checkpoint(out, model, palette, single)
