"""The one front door for weights: ``load`` reads every format igpt knows, and the converters write them.

``load(path)`` accepts an igpt checkpoint directory (full or sharded), a run directory (its newest
checkpoint), a Hugging Face ImageGPT folder (``model.safetensors`` or ``pytorch_model.bin``, sharded or
not) or a Hub model id such as ``openai/imagegpt-small`` (``igpt.weights.hub``: the local cache first; a
local path always wins), and returns the model (an ``igpt.GPT``, below), its tokenizer and its
``CheckpointRecord``. The model is in eval mode and reads ids the way its weights were trained
(``record.reading``): a BERT checkpoint's ``model(ids)`` is the bidirectional forward. OpenAI's TensorFlow
checkpoints are converted once with ``convert_openai``. ``save`` is ``load``'s mirror.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from huggingface_hub import ModelHubMixin

from igpt import model as core
from igpt.atomic import check_output, require_new, write_text
from igpt.tokenizers import PALETTE_FILE, VQ_FILE, AnyTokenizer
from igpt.record import CheckpointRecord
from igpt.weights.card import model_card, run_facts
from igpt.weights.checkpoint import CONFIG, WEIGHTS, load_head, load_igpt, resolve_checkpoint, save_checkpoint
from igpt.weights.hf import is_hf_dir, load_hf, save_hf
from igpt.weights.hub import resolve as resolve_hub
from igpt.weights.openai import load_openai

log = logging.getLogger(__name__)
T = TypeVar("T")
_PRUNE_PATIENCE = 60.0  # seconds a reader keeps choosing again while a run prunes under it
_LISTING_RETRIES = 20
SAVED_FILES = (CONFIG, WEIGHTS, PALETTE_FILE, VQ_FILE, "README.md")  # what igpt.save writes, config.json first


class GPT(core.GPT, ModelHubMixin, library_name="igpt", tags=["image-gpt"],
          paper_url="https://cdn.openai.com/papers/Generative_Pretraining_from_Pixels_V2.pdf"):
    """``igpt.GPT``: the transformer of ``igpt.model`` with the Hugging Face Hub's methods, from
    huggingface_hub's ``ModelHubMixin``:

    - ``GPT.from_pretrained(path_or_hub_id)``: whatever ``igpt.load`` reads, including Hub ids;
    - ``model.save_pretrained(dir)``: an igpt checkpoint (``igpt.save``) with a model card;
    - ``model.push_to_hub(repo_id)``: that folder, uploaded.

    Every model ``igpt.load`` returns is one of these, carrying the tokenizer its ids use (a palette or a
    VQ-VAE) and its record (``model.tokenizer``, ``model.record``), so that saving writes them back. A model
    built as ``GPT(config)`` has neither until given (``save_pretrained(dir, tokenizer=...)``)."""

    tokenizer: AnyTokenizer | None = None
    record: CheckpointRecord | None = None

    @property
    def palette(self) -> AnyTokenizer | None:
        """The old name of ``tokenizer`` (from when every tokenizer was a palette), kept for one release."""
        return self.tokenizer

    @palette.setter
    def palette(self, tokenizer: AnyTokenizer | None) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        device: str | torch.device = "cpu") -> "GPT":
        """The model (eval mode) at a local path or Hub id; ``model.tokenizer`` and ``model.record`` come
        with it. The Hub arguments are huggingface_hub's (``revision``, ``cache_dir``, ``token`` ...)."""
        path = resolve_hub(pretrained_model_name_or_path, revision=revision, cache=cache_dir, token=token,
                           local_files_only=local_files_only, force_download=force_download)
        return load(path, device).model  # type: ignore[return-value]

    def save_pretrained(self, save_directory: str | Path, *, tokenizer: AnyTokenizer | None = None,
                        record: CheckpointRecord | None = None, overwrite: bool = False,
                        push_to_hub: bool = False, repo_id: str | None = None, palette: AnyTokenizer | None = None,
                        **hub_kwargs: Any) -> str | None:
        """``igpt.save(self, tokenizer, save_directory)`` with this model's tokenizer and record unless given;
        ``push_to_hub=True`` then uploads the folder (to ``repo_id``, by default the folder's name).
        ``palette`` is the old name of ``tokenizer``, kept for one release."""
        hub_kwargs.pop("config", None)  # the mixin's JSON config: the checkpoint's record takes its place
        hub_kwargs.pop("model_card_kwargs", None)
        if palette is not None and tokenizer is not None:
            raise ValueError("save_pretrained: give tokenizer= or its old name palette=, not both")
        tokenizer = next((t for t in (tokenizer, palette, self.tokenizer) if t is not None), None)
        if tokenizer is None:
            raise ValueError("save_pretrained needs the tokenizer the model's ids use: this model has none "
                             "(it was not loaded); pass tokenizer=...")
        save(self, tokenizer, save_directory, record=self.record if record is None else record,
             overwrite=overwrite)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **hub_kwargs)
        return None


class Loaded(NamedTuple):
    model: GPT
    tokenizer: AnyTokenizer
    record: CheckpointRecord

    @property
    def palette(self) -> AnyTokenizer:
        """The old name of ``tokenizer``, kept for one release."""
        return self.tokenizer


def _hub_model(model: core.GPT, tokenizer: AnyTokenizer, record: CheckpointRecord) -> GPT:
    """The same tensors (not copies) in an ``igpt.GPT`` that knows its tokenizer and record."""
    with torch.device("meta"):
        out = GPT(model.config, causal=model.causal)
    out.load_state_dict(model.state_dict(), strict=True, assign=True)
    out.tokenizer, out.record = tokenizer, record
    return out.train(model.training)


def save(model: core.GPT, tokenizer: AnyTokenizer, out: str | Path, *, record: CheckpointRecord | None = None,
         overwrite: bool = False) -> Path:
    """``igpt.save``, the mirror of ``igpt.load``: a single-file igpt checkpoint (model.safetensors,
    config.json, and palette.npz or tokenizer.safetensors) and a model card (README.md) in ``out``, which
    ``igpt.load`` and every ``--checkpoint`` read. ``record`` defaults to the model's own (a loaded model's) or
    a new one naming its shape, tokenizer and objective. ``out`` must be new or empty unless ``overwrite``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; choose a new directory or pass overwrite=True")
    # the checkpoint replaces out whole (save_checkpoint), so overwrite=True replaces only an earlier igpt.save
    check_output(out, "out", overwrite=True, writes=SAVED_FILES, by="igpt.save")
    record = record or getattr(model, "record", None) or CheckpointRecord(
        model.config, tokenizer.fingerprint(), "ar" if model.causal else "bert")
    if record.model != model.config:
        raise ValueError(f"the record describes {record.model}, not this model's {model.config}")
    # the trunk alone: a fine-tuned model's head is not part of the GPT (igpt finetune writes both)
    record = record.replace(tokenizer_fingerprint=tokenizer.fingerprint(), sharded=False, saved_by_processes=1,
                            finetuned=None)
    save_checkpoint(out, model, tokenizer, record)
    write_text(out / "README.md", model_card(record, tokenizer, library="igpt", title=f"iGPT ({out.name})"))
    return out


def locate(path: str | Path) -> Path:
    """The directory ``load(path)`` reads: a Hugging Face folder, a checkpoint, or a run's newest checkpoint."""
    src = resolve_hub(path)
    return src if is_hf_dir(src) else resolve_checkpoint(src)


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """``igpt.load``: (model, tokenizer, record) from any weights igpt reads (see the module docstring)."""
    return load_located(path, device)[1]


def load_located(path: str | Path, device: str | torch.device = "cpu") -> tuple[Path, Loaded]:
    """``load``, and the directory it read (for a run directory: the checkpoint that was newest then)."""
    def read(src: Path) -> tuple[Path, Loaded]:
        model, tokenizer, record = load_hf(src, device) if is_hf_dir(src) else load_igpt(src, device)
        return src, Loaded(_hub_model(model, tokenizer, record), tokenizer, record)
    return _newest(path, read)


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPT, torch.nn.Linear, AnyTokenizer, CheckpointRecord]:
    """A fine-tuned checkpoint (or its run directory): (model, head, tokenizer, record). The head maps the mean
    over positions of the normed features of layer ``record.head_layer`` (``GPT.layer_features``; the final
    norm unless fine-tuned with --head-layer), (B, d), to class logits (B, n_classes)."""
    def read(ckpt_dir: Path) -> tuple[GPT, torch.nn.Linear, AnyTokenizer, CheckpointRecord]:
        model, tokenizer, record = load_igpt(ckpt_dir, device)
        return _hub_model(model, tokenizer, record), load_head(ckpt_dir, record, device), tokenizer, record
    return _newest(path, read)


def _newest(path: str | Path, read: Callable[[Path], T]) -> T:
    """``read`` the directory ``path`` names. A run that is training prunes old checkpoints as it writes new
    ones, so the one chosen may vanish before it is read (and a listing taken while checkpoints are renamed
    may miss them all): then the run's newest is chosen again, for as long as the run keeps winning the race
    (``_PRUNE_PATIENCE`` seconds, far more than one checkpoint interval)."""
    path = resolve_hub(path)
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
    model, tokenizer, record = load_hf(resolve_hub(src))
    return save_checkpoint(out, model, tokenizer, record)


def convert_openai(prefix: str | Path, out: str | Path, palette: str | Path | None = None,
                   objective: str | None = None) -> Path:
    """A released TensorFlow checkpoint (prefix ``.../model.ckpt-N``) as an igpt checkpoint."""
    require_new(out)
    model, pal, record = load_openai(prefix, palette, objective, progress=True)
    return save_checkpoint(out, model, pal, record)


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """An igpt checkpoint (AR) as a Hugging Face ImageGPT folder with its model card: a pretrained one as
    ImageGPTForCausalImageModeling, a fine-tuned one (with its head and class names) as
    ImageGPTForImageClassification."""
    require_new(out)
    src, (model, tokenizer, record) = load_located(ckpt)
    facts = run_facts(src)
    if record.finetuned is None:
        return save_hf(model, tokenizer, out, record, facts=facts)
    model, head, tokenizer, record = load_classifier(src)
    if record.head_layer != record.model.n_layer:
        raise ValueError(f"{src}: its head reads layer {record.head_layer} (fine-tuned with --head-layer), but "
                         "Hugging Face's ImageGPTForImageClassification reads the final norm; it cannot be exported")
    return save_hf(model, tokenizer, out, record, head=head.weight, facts=facts)


def consolidate(src: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint (or the newest one of a run) as a single-file checkpoint: model.safetensors,
    config.json and the tokenizer, read by ``igpt.load`` anywhere. Done in one process, which needs the full
    weights in memory (not the optimizer state: the result is for inference, fine-tuning and export; the
    sharded checkpoint itself stays the one to resume training from)."""
    require_new(out)
    ckpt_dir = locate(src)
    model, tokenizer, record = load(ckpt_dir)
    if not record.sharded:
        raise ValueError(f"{ckpt_dir} is not a sharded checkpoint (its config.json does not declare one); it "
                         "is already a single-file checkpoint")
    single = record.replace(sharded=False, saved_by_processes=1,
                            source={"format": "igpt-sharded", "path": str(ckpt_dir)})
    return save_checkpoint(out, model, tokenizer, single)
