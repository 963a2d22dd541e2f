"""Checkpoints: safetensors weights + JSON config + palette + training state, written atomically.

A checkpoint is a directory::

    step-0001000/
      model.safetensors   weights of the uncompiled GPT (strictly loaded)
      config.json         {"format": "igpt", "model": {...}, "palette_fingerprint": ..., "step": ..., ...}
      palette.npz         the palette the ids were made with (igpt.palette format)
      train_state.pt      optimizer, data position and RNG state (pretraining checkpoints only)
      classifier.safetensors  fine-tuned checkpoints only: head.weight [n_classes, d]; config.json then has
                          "objective": "finetune", "base_objective", "n_classes" and "classes"

A sharded checkpoint (``--sharded-checkpoint``, see ``igpt.weights.sharded``) holds ``sharded/`` in place
of model.safetensors and keeps the optimizer there; everything here reads both kinds.

A run directory holds ``checkpoints/step-*``; ``load(run_dir)`` takes the newest complete one. Each
directory is assembled under a temporary name and renamed into place, so a crash (even SIGKILL) leaves
either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.palette import Palette
from igpt.weights.sharded import is_sharded, load_sharded

WEIGHTS, CONFIG, PALETTE, STATE = "model.safetensors", "config.json", "palette.npz", "train_state.pt"
CLASSIFIER = "classifier.safetensors"
FORMAT_VERSION = 1


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: str | Path, model: GPT, palette: Palette, info: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None,
                    classifier: dict[str, torch.Tensor] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint directory atomically. ``model`` must be the uncompiled module;
    ``classifier`` (a fine-tuned head's tensors) goes to classifier.safetensors."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # state_dict: the weights gathered from a sharded (FSDP) model, when model itself holds only shards
    state = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or model.state_dict()).items()}
    save_file(state, str(tmp / WEIGHTS))
    write_small_files(tmp, model.config, palette, info, train_state)
    if classifier is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in classifier.items()}, str(tmp / CLASSIFIER))
    if ckpt_dir.exists():  # replace an older checkpoint of the same name: move it aside, then swap
        old = ckpt_dir.with_name(f".{ckpt_dir.name}.old-{os.getpid()}")
        os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, ckpt_dir)
    return ckpt_dir


def write_small_files(ckpt_dir: Path, config: ModelConfig, palette: Palette, info: dict[str, Any] | None,
                      train_state: dict[str, Any] | None) -> None:
    """Everything of a checkpoint but its weights: palette.npz, config.json and train_state.pt."""
    if config.n_vocab != palette.k:
        raise ValueError(f"model has {config.n_vocab} ids but the palette has {palette.k} colours")
    palette.save(ckpt_dir / PALETTE)
    meta = {"format": "igpt", "format_version": FORMAT_VERSION, "model": config.to_dict(),
            "palette_fingerprint": palette.fingerprint(), **(info or {})}
    write_json_atomic(ckpt_dir / CONFIG, meta)
    if train_state is not None:
        torch.save(train_state, ckpt_dir / STATE)


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / CONFIG).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for old in step_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / WEIGHTS).exists() or is_sharded(path):
        return path
    ckpts = step_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise ValueError(f"{path} is neither an igpt checkpoint (no {WEIGHTS}) nor a run directory with "
                     f"checkpoints/step-*")


def read_config(ckpt_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((ckpt_dir / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {ckpt_dir / CONFIG}: {e}") from None
    if config.get("format") != "igpt":
        raise ValueError(f"{ckpt_dir / CONFIG} is not an igpt checkpoint config")
    return config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Palette, dict[str, Any]]:
    """Load (model in eval mode, palette, config dict). Weights are loaded strictly: a missing,
    unexpected or mis-shaped tensor is an error naming it. A Hugging Face ImageGPT directory (its config.json
    says ``"model_type": "imagegpt"``) is converted on the fly by ``igpt.weights.hf``."""
    from igpt.weights import hf as interop  # imported here: interop itself builds on this module

    if interop.is_hf_dir(path):
        return interop.load_hf(path, device)
    ckpt_dir = resolve_checkpoint(path)
    config = read_config(ckpt_dir)
    model = GPT(ModelConfig.from_dict(config["model"]))
    if is_sharded(ckpt_dir):
        load_sharded(ckpt_dir, model)  # re-assembled in this process from every writer's shards
    else:
        _load_weights(ckpt_dir, model)
    palette = Palette.load(ckpt_dir / PALETTE)
    if palette.fingerprint() != config["palette_fingerprint"]:
        raise ValueError(f"{ckpt_dir / PALETTE} has fingerprint {palette.fingerprint()} but the checkpoint "
                         f"records {config['palette_fingerprint']}")
    return model.to(device).eval(), palette, config


def _load_weights(ckpt_dir: Path, model: GPT) -> None:
    """model.safetensors into ``model``, strictly: a missing, unexpected or mis-shaped tensor is an error."""
    state = load_file(str(ckpt_dir / WEIGHTS))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir / WEIGHTS}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{ckpt_dir / WEIGHTS}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the config implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Palette]:
    """``igpt.load``: the model (eval mode) and its palette from a checkpoint or run directory."""
    model, palette, _ = load_checkpoint(path, device)
    return model, palette


def check_new_output(out: Path) -> None:
    """Converters never overwrite: --out must be new (or an empty directory)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; choose a new directory")


def consolidate(src: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint (or the newest one of a run) as a single-file checkpoint: model.safetensors,
    config.json and palette.npz, read by ``igpt.load`` anywhere. Done in one process, which needs the
    full weights in memory (not the optimizer state: the result is for inference, fine-tuning and export;
    the sharded checkpoint itself stays the one to resume training from)."""
    check_new_output(Path(out))
    ckpt_dir = resolve_checkpoint(src)
    if not is_sharded(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is not a sharded checkpoint (it has no sharded/.metadata); it is "
                         f"already a single-file checkpoint")
    model, palette, config = load_checkpoint(ckpt_dir)
    skip = {"format", "format_version", "model", "palette_fingerprint", "sharded"}
    info = {k: v for k, v in config.items() if k not in skip}
    return save_checkpoint(out, model, palette, {**info, "consolidated_from": str(ckpt_dir)})


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / STATE
    if not path.exists():
        raise ValueError(f"{ckpt_dir} has no {STATE}: it cannot be resumed (was it exported, not trained?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPT, torch.nn.Linear, Palette, list[str] | None]:
    """A fine-tuned checkpoint (or run directory): (model, head, palette, class names). The head maps the
    mean over positions of the final norm's output, (B, d), to class logits (B, n_classes)."""
    ckpt_dir = resolve_checkpoint(path)
    model, palette, config = load_checkpoint(ckpt_dir, device)
    if not (ckpt_dir / CLASSIFIER).exists():
        raise ValueError(f"{ckpt_dir} has no {CLASSIFIER}: it is not a fine-tuned classifier (see igpt finetune)")
    weight = load_file(str(ckpt_dir / CLASSIFIER)).get("head.weight")
    n_classes = config.get("n_classes")
    if weight is None or tuple(weight.shape) != (n_classes, model.config.n_embd):
        raise ValueError(f"{ckpt_dir / CLASSIFIER}: expected head.weight of shape ({n_classes}, "
                         f"{model.config.n_embd}), got {None if weight is None else tuple(weight.shape)}")
    head = torch.nn.Linear(model.config.n_embd, n_classes, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return model, head.to(device).eval(), palette, config.get("classes")
