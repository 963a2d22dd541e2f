"""The one front door for weights: ``load`` reads every format igpt knows, and the converters write them.

``load(path)`` accepts an igpt checkpoint directory (full or sharded), a run directory (its newest
checkpoint) or a Hugging Face ImageGPT folder (``model.safetensors`` or ``pytorch_model.bin``, sharded or
not), and returns the model, its palette and its ``CheckpointRecord``. The model is in eval mode and reads
ids the way its weights were trained (``record.reading``): a BERT checkpoint's ``model(ids)`` is the
bidirectional forward. OpenAI's TensorFlow checkpoints are converted once with ``convert_openai``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch

from igpt.atomic import require_new
from igpt.model import GPT
from igpt.palette import Palette
from igpt.record import CheckpointRecord
from igpt.weights.checkpoint import load_head, load_igpt, resolve_checkpoint, save_checkpoint
from igpt.weights.hf import is_hf_dir, load_hf, save_hf
from igpt.weights.openai import load_openai

log = logging.getLogger(__name__)


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
    src = locate(path)
    return Loaded(*(load_hf(src, device) if is_hf_dir(src) else load_igpt(src, device)))


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPT, torch.nn.Linear, Palette, CheckpointRecord]:
    """A fine-tuned checkpoint (or its run directory): (model, head, palette, record). The head maps the mean
    over positions of the final norm's output, (B, d), to class logits (B, n_classes)."""
    ckpt_dir = locate(path)
    model, palette, record = load(ckpt_dir, device)
    return model, load_head(ckpt_dir, record, device), palette, record


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
