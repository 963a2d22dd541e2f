"""Checkpoints: safetensors weights + the typed record (``igpt.record``) + tokenizer + training state, written
atomically.

A checkpoint is a directory::

    step-0001000/
      model.safetensors       weights of the uncompiled GPT (strictly loaded)
      config.json             the CheckpointRecord: model shape, objective, tokenizer fingerprint, step, ...
      palette.npz             the tokenizer the ids were made with: a palette (igpt.tokenizers.palette format), or
      tokenizer.safetensors     a VQ-VAE (igpt.tokenizers.vq); the record's tokenizer_fingerprint names either
      train_state.json        pretraining checkpoints only: optimizer, data position and RNG state, the
      train_state.safetensors   tensors in the safetensors file, the rest in the JSON (igpt.weights.trainstate)
      classifier.safetensors  fine-tuned checkpoints only: head.weight [n_classes, d]

None of these files is a pickle, so reading them cannot run code. Checkpoints written before
train_state.json existed hold ``train_state.pt`` instead, still read by torch's restricted unpickler.

A sharded checkpoint (``--sharded-checkpoint``, ``igpt.weights.sharded``) declares ``"sharded": true`` in
its record and holds ``sharded/`` in place of model.safetensors (the optimizer is there too). DCP writes
those files with pickle; ``igpt.weights.sharded`` reads them with restricted unpicklers.

A run directory holds ``checkpoints/step-*``; ``resolve_checkpoint(run_dir)`` is the newest complete one.
Each directory is assembled under a temporary name and renamed into place, so a crash (even SIGKILL) leaves
the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from igpt.atomic import read_json, remove_dir, replacing_dir, write_error, write_json
from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.record import CheckpointRecord
from igpt.tensorfile import require_fields
from igpt.tokenizers import PALETTE_FILE, AnyTokenizer, file_name, load_tokenizer, stored_in
from igpt.weights.sharded import SHARDS, load_sharded, model_shapes
from igpt.weights.tensors import (build_model, gpt_fields, load_weight_file, nbytes, read_shapes, save_tensors,
                                  unreadable)
from igpt.weights.trainstate import load_train_state_files, save_train_state

WEIGHTS, CONFIG, CLASSIFIER = "model.safetensors", "config.json", "classifier.safetensors"
PALETTE = PALETTE_FILE  # the tokenizer file of a palette checkpoint (a VQ-VAE's is tokenizer.safetensors)
STATE, STATE_TENSORS = "train_state.json", "train_state.safetensors"
LEGACY_STATE = "train_state.pt"  # a torch.save pickle, written by earlier versions


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(ckpt_dir: str | Path, model: GPT, tokenizer: AnyTokenizer, record: CheckpointRecord,
                    train_state: dict[str, Any] | None = None, classifier: dict[str, torch.Tensor] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint directory atomically. ``model`` must be the uncompiled module;
    ``state_dict``: the weights gathered from a sharded (FSDP) model, when ``model`` itself holds only
    shards; ``classifier`` (a fine-tuned head's tensors) goes to classifier.safetensors. A failed write (a
    full disk, a file-size limit) leaves nothing behind and is a one-line error saying how much was needed."""
    weights = _cpu(state_dict or model.state_dict())
    try:
        with replacing_dir(ckpt_dir) as tmp:
            save_tensors(weights, tmp / WEIGHTS)
            write_small_files(tmp, record, tokenizer, train_state)
            if classifier is not None:
                save_tensors(_cpu(classifier), tmp / CLASSIFIER)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise write_error(e, ckpt_dir, nbytes([weights, classifier, train_state])) from e
    return Path(ckpt_dir)


def write_small_files(ckpt_dir: Path, record: CheckpointRecord, tokenizer: AnyTokenizer,
                      train_state: dict[str, Any] | None) -> None:
    """Everything of a checkpoint but its weights: the tokenizer (palette.npz or tokenizer.safetensors),
    config.json and the train state."""
    what, unit = ("palette", "colours") if tokenizer.kind == "palette" else ("VQ-VAE tokenizer", "codes")
    if record.model.n_vocab != tokenizer.k:
        raise ValueError(f"model has {record.model.n_vocab} ids but the {what} has {tokenizer.k} {unit}")
    if record.tokenizer_fingerprint != tokenizer.fingerprint():
        raise ValueError(f"the record names {what} {record.tokenizer_fingerprint}, not {tokenizer.fingerprint()}")
    tokenizer.pixel_side(record.model.n_px)  # a VQ-VAE's grid must be the model's
    tokenizer.save(ckpt_dir / file_name(tokenizer))
    write_json(ckpt_dir / CONFIG, record.to_json())
    if train_state is not None:
        save_train_state(train_state, ckpt_dir / STATE, ckpt_dir / STATE_TENSORS)


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG).is_file() and stored_in(path) is not None


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / CONFIG).exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(ckpt_dir: Path) -> int:
    """The step of a step checkpoint, from its name ``step-NNNNNNN``."""
    return int(ckpt_dir.name.split("-")[1])


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and those of the steps that are multiples of
    ``keep_every`` (when it is > 0), each renamed away before it is deleted, so a reader never finds one half
    gone."""
    for old in step_checkpoints(run_dir)[:-keep_last]:
        if not (keep_every and checkpoint_step(old) % keep_every == 0):
            remove_dir(old)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_checkpoint(path):
        return path
    ckpts = step_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise ValueError(f"{path} is neither an igpt checkpoint (no {CONFIG} and {PALETTE}), a run directory with "
                     "checkpoints/step-*, nor a Hugging Face ImageGPT folder")


def read_record(ckpt_dir: Path) -> CheckpointRecord:
    return CheckpointRecord.from_json(read_json(ckpt_dir / CONFIG), str(ckpt_dir / CONFIG))


def load_igpt(ckpt_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, AnyTokenizer, CheckpointRecord]:
    """(model in eval mode, read as its record says; tokenizer; record) of one igpt checkpoint directory.
    Weights are loaded strictly: a missing, unexpected or mis-shaped tensor is an error naming it."""
    record = read_record(ckpt_dir)
    path = stored_in(ckpt_dir)
    if path is None:
        raise ValueError(f"{ckpt_dir}: no tokenizer ({PALETTE} or tokenizer.safetensors)")
    tokenizer = load_tokenizer(path)
    if tokenizer.fingerprint() != record.tokenizer_fingerprint:
        raise ValueError(f"{path} has fingerprint {tokenizer.fingerprint()} but the checkpoint "
                         f"records {record.tokenizer_fingerprint}")
    causal = record.reading.causal
    # The record's shape is compared with the stored tensors' before a model of that shape is built.
    if record.sharded:  # re-assembled in this process from every writer's shards
        _require_shape(record, model_shapes(ckpt_dir), ckpt_dir / SHARDS)
        model = GPT(record.model, causal=causal)
        load_sharded(ckpt_dir, model)
    else:
        weights = ckpt_dir / WEIGHTS
        if not weights.is_file():
            raise ValueError(f"{ckpt_dir}: {WEIGHTS} is missing")
        _require_shape(record, read_shapes(weights), weights)
        model = build_model(record.model, load_weight_file(weights), causal=causal, where=str(weights))
    return model.to(device).eval(), tokenizer, record


def require_run_shape(run_dir: Path, model_cfg: ModelConfig) -> None:
    """A run's recorded model (``run.json``) has the shape of its newest checkpoint that reads, checked
    before a resume builds the model from the record: an edited or damaged ``run.json`` claiming
    ``n_layer 200000`` would otherwise allocate that model first. Sharded checkpoints are checked against
    their own index when they are read."""
    for ckpt_dir in reversed(step_checkpoints(run_dir)):
        weights = ckpt_dir / WEIGHTS
        try:
            shapes = read_shapes(weights)
        except ValueError:
            continue  # a damaged newest checkpoint: the resume sets it aside and reads the one before
        require_fields(model_cfg.to_dict(), gpt_fields(shapes), str(run_dir / "run.json"), str(weights))
        return


def _require_shape(record: CheckpointRecord, shapes: dict[str, tuple[int, ...]], weights: Path) -> None:
    """The record's n_layer, n_embd, n_vocab and n_px are those of the stored tensors (a config.json edited
    to n_layer 200000 beside a two-block model is refused here, before anything of that size is built)."""
    require_fields(record.model.to_dict(), gpt_fields(shapes), str(weights.parent / CONFIG), str(weights))


def load_head(ckpt_dir: Path, record: CheckpointRecord, device: str | torch.device = "cpu") -> torch.nn.Linear:
    """The classifier head of a fine-tuned checkpoint: (B, d) mean-pooled normed features of the layer
    ``record.head_layer`` (the final norm unless fine-tuned with --head-layer) -> class logits."""
    if record.finetuned is None or not (ckpt_dir / CLASSIFIER).is_file():
        raise ValueError(f"{ckpt_dir} has no {CLASSIFIER}: it is not a fine-tuned classifier (see igpt finetune)")
    n_classes, d = record.finetuned.n_classes, record.model.n_embd
    weight = load_weight_file(ckpt_dir / CLASSIFIER).get("head.weight")
    if weight is None or tuple(weight.shape) != (n_classes, d):
        raise ValueError(f"{ckpt_dir / CLASSIFIER}: expected head.weight of shape ({n_classes}, {d}), got "
                         f"{None if weight is None else tuple(weight.shape)}")
    head = torch.nn.Linear(d, n_classes, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head.to(device).eval()


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    """What the trainer saved with the checkpoint (``save_checkpoint(train_state=...)``), tensors on the CPU."""
    if (ckpt_dir / STATE).exists():
        return load_train_state_files(ckpt_dir / STATE, ckpt_dir / STATE_TENSORS)
    legacy = ckpt_dir / LEGACY_STATE
    if not legacy.exists():
        raise ValueError(f"{ckpt_dir} has no {STATE}: it cannot be resumed (was it exported, not trained?)")
    # The only pickle of igpt's own formats still read: train_state.pt of runs written by earlier versions,
    # through torch's restricted unpickler (tensors and plain values only; any other global is refused).
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the unpickler trips on, the file is unusable
        raise ValueError(f"{legacy} cannot be read as a train state: {unreadable(e)}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{legacy} holds a {type(state).__name__}, not a train state")
    return state
