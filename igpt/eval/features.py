"""Probe features of every layer in one batched pass over a split, cached on disk (paper section 2.3).

For layer l < L the feature is block l's first norm applied to the residual stream entering it,
``ln_1(h^l)``; for l = L it is the final norm ``ln_f(h^L)``; both mean-pooled over the T positions
(``GPT.layer_features``). All L + 1 layers come out of one forward pass per batch, so probing every layer
costs one pass over the data; the result is written to ``feats-{split}-{key}.npz`` (one array per layer)
and reused by any later run whose inputs give the same key.

The key hashes what the features depend on: the checkpoint (path, step, size and mtime of its files,
palette fingerprint; or any caller-given identity such as a random init's config and seed), the *content*
of the split (pixels or ids and labels), the layers and every extraction option below.

BERT checkpoints are read bidirectionally. By default their inputs are masked as in training (each
position with probability ``mask_prob``, drawn from a generator derived from (seed, mask index, batch
start)), because the paper found BERT features must be read from masked inputs. With ``n_masks`` K > 1
the features are the *mean over K independent masks*: the paper ensembled 5 masks by a modal vote of
the classifier's predictions; averaging the features instead keeps one probe per layer and one cache
entry per split, and is what we do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt.atomic import replacing
from igpt.config import FeatureConfig
from igpt.arrays import npz_array, open_npz
from igpt.data.imageset import ImageSet
from igpt.data.streams import to_ids
from igpt.model import GPT
from igpt.objectives import sample_keep_mask
from igpt.palette import Palette
from igpt.record import PAPER_MASK_PROB, CheckpointRecord, Reading
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype
from igpt.stop import GracefulStop, Stopped


# ---------------------------------------------------------------------------------------------- extraction


def for_reading(cfg: FeatureConfig, reading: Reading) -> FeatureConfig:
    """``cfg`` with its mask rate filled in: -1 means the rate the weights were trained with."""
    return cfg if cfg.mask_prob != -1 else dataclasses.replace(cfg, mask_prob=reading.mask_prob)


def _split_feats(model: GPT, ids: torch.Tensor, cfg: FeatureConfig, layers: list[int],
                 batch_start: int) -> dict[int, torch.Tensor]:
    """{layer: (B, D)} for one batch of ids (B, T), averaged over masks and mirror images as configured."""
    B, T = ids.shape
    views = [ids]
    if cfg.flip_average:
        n = model.config.n_px
        views.append(ids.view(B, n, n).flip(2).reshape(B, T))  # raster order: flip each row
    masked = not model.causal and cfg.bert_mask
    mask_prob = PAPER_MASK_PROB if cfg.mask_prob == -1 else cfg.mask_prob  # callers fill it in: for_reading
    total: dict[int, torch.Tensor] = {}
    count = 0
    for k in range(cfg.n_masks if masked else 1):
        keep = None
        if masked:  # the same mask for an image and its mirror: only the content differs
            keep = sample_keep_mask((B, T), mask_prob, derived_generator(cfg.mask_seed, k, batch_start),
                                    ids.device)
        for view in views:
            feats = model.layer_features(view, layers, keep=keep)  # read as the model was trained
            for layer, f in feats.items():
                total[layer] = total[layer] + f if layer in total else f
            count += 1
    return {layer: f / count for layer, f in total.items()}


class ExtractionStopped(Stopped):
    """A signal stopped ``extract`` between batches: ``feats`` hold the first ``done`` images' features."""

    def __init__(self, message: str, done: int, feats: dict[int, np.ndarray]) -> None:
        super().__init__(message)
        self.done, self.feats = done, feats


@torch.no_grad()
def extract(model: GPT, images: ImageSet, palette: Palette, cfg: FeatureConfig = FeatureConfig(), *,
            layers: list[int] | None = None, progress: bool = True, desc: str = "features",
            resume: tuple[int, dict[int, np.ndarray]] | None = None) -> dict[int, np.ndarray]:
    """{layer: feats (N, D) float32} of every image of ``images`` (default layers 0..L), batched, under
    bf16 autocast on GPU, read as the model was trained (``model.causal``; a BERT model's inputs masked as
    ``cfg`` says). The model is moved to the configured device and put in eval mode. ``resume`` (done,
    feats) continues an extraction that SIGTERM or Ctrl-C stopped (``ExtractionStopped``)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = model.to(device).eval()
    palette = palette.to(device)
    layers = list(range(model.config.n_layer + 1)) if layers is None else sorted(set(layers))
    if len(images) == 0:
        raise ValueError(f"--data {images.source}: the split is empty")
    n, d = len(images), model.config.n_embd
    done, out = resume or (0, {layer: np.empty((n, d), np.float32) for layer in layers})
    with tqdm(total=n, initial=done, desc=desc, unit="img", disable=not progress) as bar, \
            GracefulStop(desc) as stop:
        # Batches start at multiples of the batch size, as in one uninterrupted pass (the BERT masks are
        # drawn from each batch's start), so a resumed extraction gives the same features.
        for start in range(done, n, cfg.batch_size):
            if stop.requested:
                raise ExtractionStopped(f"stopped by {stop.signal_name} after {start} of {n} images ({desc})",
                                        start, out)
            index = np.arange(start, min(n, start + cfg.batch_size))
            ids = to_ids(images, index, palette, device)  # (B, T)
            with autocast(device, dtype):
                feats = _split_feats(model, ids, cfg, layers, start)
            for layer, f in feats.items():
                out[layer][index] = f.float().cpu().numpy()
            bar.update(len(index))
    return out


# ---------------------------------------------------------------------------------------------- cache


def checkpoint_identity(ckpt_dir: Path, record: CheckpointRecord) -> dict[str, Any]:
    """What names a checkpoint's weights cheaply: the size and modification time of every file in its
    directory (checkpoint directories are written once, atomically), whichever format holds the weights."""
    files = sorted(p for p in Path(ckpt_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
    stats = [(str(p.relative_to(ckpt_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"checkpoint": str(Path(ckpt_dir).resolve()), "step": record.step, "files": stats,
            "palette": record.palette_fingerprint}


def _content_hash(images: ImageSet) -> str:
    h = hashlib.blake2b(digest_size=16)
    x = images.pixels if images.pixels is not None else images.ids
    for start in range(0, len(x), 8192):  # chunks, so a memory-mapped split is never copied whole
        h.update(np.ascontiguousarray(x[start:start + 8192]).tobytes())
    if images.labels is not None:
        h.update(np.asarray(images.labels, np.int64).tobytes())
    return h.hexdigest()


def cache_key(model_identity: dict[str, Any], images: ImageSet, split: str, cfg: FeatureConfig, causal: bool,
              layers: list[int] | None) -> str:
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("cache", "device")}
    if causal or not cfg.bert_mask:
        options = {k: v for k, v in options.items() if k not in ("mask_prob", "n_masks", "mask_seed", "batch_size")}
    parts = {"model": model_identity, "data": _content_hash(images), "split": split, "n_px": images.n_px,
             "objective": "ar" if causal else "bert", "layers": layers, "options": options}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_extract(model: GPT, images: ImageSet, palette: Palette, cfg: FeatureConfig, *, split: str,
                   model_identity: dict[str, Any], cache_dir: str | Path | None,
                   layers: list[int] | None = None, progress: bool = True) -> dict[int, np.ndarray]:
    """``extract``, reading ``cache_dir/feats-{split}-{key}.npz`` when an earlier run wrote it (and
    ``cfg.cache``), writing it otherwise (atomically: a temporary file, then a rename)."""
    if cache_dir is None:
        return extract(model, images, palette, cfg, layers=layers, progress=progress, desc=f"features {split}")
    key = cache_key(model_identity, images, split, cfg, model.causal, layers)
    path = Path(cache_dir) / f"feats-{split}-{key}.npz"
    partial = path.with_name(f"feats-{split}-{key}.partial.npz")  # an extraction stopped part-way
    if cfg.cache and path.is_file():
        return _read_feats(path)[1]
    resume = _read_feats(partial) if cfg.cache and partial.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        feats = extract(model, images, palette, cfg, layers=layers, progress=progress, desc=f"features {split}",
                        resume=resume)
    except ExtractionStopped as e:
        _write_feats(partial, e.feats, e.done)
        raise Stopped(f"{e}; saved in {partial}: the same command continues from there") from None
    _write_feats(path, feats)
    partial.unlink(missing_ok=True)
    return feats


def _write_feats(path: Path, feats: dict[int, np.ndarray], done: int | None = None) -> None:
    arrays = {f"layer_{layer}": x for layer, x in feats.items()}
    if done is not None:
        arrays["done"] = np.asarray(done)
    # through a handle: np.savez would append .npz to the temporary name
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _read_feats(path: Path) -> tuple[int, dict[int, np.ndarray]]:
    """(images done, {layer: feats}) of a file ``_write_feats`` wrote (pickles refused)."""
    try:
        with open_npz(path) as z:
            feats = {int(name.split("_")[1]): npz_array(z, name, path) for name in z.files if name.startswith("layer_")}
            done = int(npz_array(z, "done", path)) if "done" in z.files else len(next(iter(feats.values())))
    except (ValueError, StopIteration) as e:  # a damaged cache file (the error names it): say how to do without it
        raise ValueError(f"{e or path}; delete it, or pass --no-cache") from None
    return done, feats
