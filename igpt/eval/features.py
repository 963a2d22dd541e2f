"""Probe features of the chosen layers in one batched pass over a split, streamed to disk (paper section 2.3).

For layer l < L the feature is block l's first norm applied to the residual stream entering it,
``ln_1(h^l)``; for l = L it is the final norm ``ln_f(h^L)``; both mean-pooled over the T positions
(``GPT.layer_features``). The selected layers (``--layers``) come out of one forward pass per batch, and
each batch is written straight to one memory-mapped ``.npy`` file per layer (``igpt.eval.feature_store``),
so host memory holds one batch of activations whatever the size of the split. The store lives in
``feats-{split}-{key}/`` and is reused, or continued after an interruption, by any later run whose inputs
give the same key.

The key hashes what the features depend on: the checkpoint (path, step, size and mtime of its files,
tokenizer fingerprint; or any caller-given identity such as a random init's config and seed), the *content*
of the split (pixels or ids and labels), the layers, the storage dtype and every extraction option below.

BERT checkpoints are read bidirectionally. By default their inputs are masked as in training (each
position with probability ``mask_prob``, the checkpoint's own rate unless overridden, drawn from a
generator derived from (seed, mask index, batch start)), because the paper found BERT features must be
read from masked inputs. With ``n_masks`` K > 1 and ``mask_combine="mean"`` the features are the mean over
K independent masks; with ``"vote"`` each mask's features are stored apart (``mask_index``) so that a
probe's K predictions can be combined by a modal vote, as the paper did.

``feature_plan`` gives the disk and memory a run needs before it starts (docs/evaluation.md derives it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt.config import FeatureConfig, ModelConfig
from igpt.data.imageset import ImageSet
from igpt.data.streams import to_ids
from igpt.eval.feature_store import DTYPES, FeatureStore, LayerFeatures
from igpt.model import GPT
from igpt.objectives import sample_keep_mask
from igpt.tokenizers import AnyTokenizer
from igpt.record import PAPER_MASK_PROB, CheckpointRecord, Reading
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype
from igpt.stop import GracefulStop, Stopped


def parse_layers(spec: str, n_layer: int) -> list[int]:
    """The layers a ``--layers`` value names, sorted: 'all' (0..n_layer), '0,3,5', '2-10', or a mix. An
    entry outside 0..n_layer is a one-line error naming it."""
    if spec.strip() == "all":
        return list(range(n_layer + 1))
    layers: set[int] = set()
    for entry in (e.strip() for e in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", entry)
        if not m:
            raise ValueError(f"--layers: {entry!r} is not a layer, a range 'a-b' or 'all'")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi:
            raise ValueError(f"--layers: the range {entry!r} is empty")
        if hi > n_layer:
            raise ValueError(f"--layers: layer {hi} (in {entry!r}) is outside this model, whose layers are "
                             f"0..{n_layer}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


# ---------------------------------------------------------------------------------------------- extraction


def for_reading(cfg: FeatureConfig, reading: Reading) -> FeatureConfig:
    """``cfg`` with its mask rate filled in: -1 means the rate the weights were trained with."""
    return cfg if cfg.mask_prob != -1 else dataclasses.replace(cfg, mask_prob=reading.mask_prob)


def _split_feats(model: GPT, ids: torch.Tensor, cfg: FeatureConfig, layers: list[int], batch_start: int,
                 masks: range) -> dict[int, torch.Tensor]:
    """{layer: (B, D)} for one batch of ids (B, T), averaged over ``masks`` (mask indices) and mirror images
    as configured."""
    B, T = ids.shape
    views = [ids]
    if cfg.flip_average:
        n = model.config.n_px
        views.append(ids.view(B, n, n).flip(2).reshape(B, T))  # raster order: flip each row
    masked = not model.causal and cfg.bert_mask
    mask_prob = PAPER_MASK_PROB if cfg.mask_prob == -1 else cfg.mask_prob  # callers fill it in: for_reading
    total: dict[int, torch.Tensor] = {}
    count = 0
    for k in masks if masked else range(1):
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


def _mask_range(cfg: FeatureConfig, mask_index: int | None) -> range:
    """The masks one feature row averages: all K (``mean``), or the single one a vote reads."""
    return range(cfg.n_masks) if mask_index is None else range(mask_index, mask_index + 1)


def _batches(model: GPT, images: ImageSet, tokenizer: AnyTokenizer, cfg: FeatureConfig, layers: list[int], start: int,
             mask_index: int | None) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
    """(batch start, {layer: (B, D) float32}) from image ``start`` on. Batches start at multiples of the
    batch size, as in one uninterrupted pass (the BERT masks are drawn from each batch's start), so a
    resumed extraction gives the same features."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = model.to(device).eval()
    tokenizer = tokenizer.to(device)
    masks = _mask_range(cfg, mask_index)
    for first in range(start, len(images), cfg.batch_size):
        index = np.arange(first, min(len(images), first + cfg.batch_size))
        with torch.no_grad(), autocast(device, dtype):  # not held across the yield: the caller's mode stays
            ids = to_ids(images, index, tokenizer, device)  # (B, T)
            feats = _split_feats(model, ids, cfg, layers, first, masks)
            arrays = {layer: f.float().cpu().numpy() for layer, f in feats.items()}
        yield first, arrays


def _check(model: GPT, images: ImageSet, layers: list[int] | None) -> list[int]:
    if len(images) == 0:
        raise ValueError(f"--data {images.source}: the split is empty")
    n_layer = model.config.n_layer
    if layers is None:
        return list(range(n_layer + 1))
    outside = [layer for layer in layers if not 0 <= layer <= n_layer]
    if outside:
        raise ValueError(f"--layers: layer {outside[0]} is outside this model, whose layers are 0..{n_layer}")
    return sorted(set(layers))


def extract(model: GPT, images: ImageSet, tokenizer: AnyTokenizer, cfg: FeatureConfig = FeatureConfig(), *,
            layers: list[int] | None = None, progress: bool = True, desc: str = "features",
            mask_index: int | None = None) -> dict[int, np.ndarray]:
    """{layer: feats (N, D) float32} of every image of ``images`` (default layers 0..L), in memory: for small
    splits and tests (``cached_extract`` streams to disk). Batched, under bf16 autocast on GPU, read as the
    model was trained (``model.causal``; a BERT model's inputs masked as ``cfg`` says)."""
    layers = _check(model, images, layers)
    out = {layer: np.empty((len(images), model.config.n_embd), np.float32) for layer in layers}
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for start, feats in _batches(model, images, tokenizer, cfg, layers, 0, mask_index):
            for layer, f in feats.items():
                out[layer][start:start + len(f)] = f
            bar.update(len(next(iter(feats.values()))))
    return out


def extract_to_store(model: GPT, images: ImageSet, tokenizer: AnyTokenizer, cfg: FeatureConfig, store: FeatureStore, *,
                     progress: bool = True, desc: str = "features", mask_index: int | None = None) -> LayerFeatures:
    """Fill ``store`` (continuing from its progress record when ``cfg.cache`` and it matches; from scratch
    otherwise), one batch at a time; SIGTERM or Ctrl-C stop it between batches with the rows so far kept."""
    done = store.done() if cfg.cache else None
    if done is None:
        store.create()
        done = 0
    n = len(images)
    if done == n:
        return store.features()
    with store, tqdm(total=n, initial=done, desc=desc, unit="img", disable=not progress) as bar, \
            GracefulStop(desc) as stop:
        for start, feats in _batches(model, images, tokenizer, cfg, store.layers, done, mask_index):
            if stop.requested:
                raise Stopped(f"stopped by {stop.signal_name} after {start} of {n} images ({desc}); kept in "
                              f"{store.path}: the same command continues from there")
            store.write(start, feats)
            count = len(next(iter(feats.values())))
            store.commit(start + count)
            bar.update(count)
    return store.features()


# ---------------------------------------------------------------------------------------------- cache


def checkpoint_identity(ckpt_dir: Path, record: CheckpointRecord) -> dict[str, Any]:
    """What names a checkpoint's weights cheaply: the size and modification time of every file in its
    directory (checkpoint directories are written once, atomically), whichever format holds the weights."""
    files = sorted(p for p in Path(ckpt_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
    stats = [(str(p.relative_to(ckpt_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"checkpoint": str(Path(ckpt_dir).resolve()), "step": record.step, "files": stats,
            "tokenizer": record.tokenizer_fingerprint}


def _content_hash(images: ImageSet) -> str:
    h = hashlib.blake2b(digest_size=16)
    x = images.pixels if images.pixels is not None else images.ids
    for start in range(0, len(x), 8192):  # chunks, so a memory-mapped split is never copied whole
        h.update(np.ascontiguousarray(x[start:start + 8192]).tobytes())
    if images.labels is not None:
        h.update(np.asarray(images.labels, np.int64).tobytes())
    return h.hexdigest()


def cache_key(model_identity: dict[str, Any], images: ImageSet, split: str, cfg: FeatureConfig, causal: bool,
              layers: list[int] | None, mask_index: int | None = None) -> str:
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in ("cache", "device", "layers")}
    if causal or not cfg.bert_mask:
        options = {k: v for k, v in options.items()
                   if k not in ("mask_prob", "n_masks", "mask_seed", "batch_size", "mask_combine")}
        mask_index = None
    parts = {"model": model_identity, "data": _content_hash(images), "split": split, "n_px": images.n_px,
             "objective": "ar" if causal else "bert", "layers": layers, "options": options, "mask": mask_index}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_extract(model: GPT, images: ImageSet, tokenizer: AnyTokenizer, cfg: FeatureConfig, *, split: str,
                   model_identity: dict[str, Any], cache_dir: str | Path | None,
                   layers: list[int] | None = None, progress: bool = True,
                   mask_index: int | None = None) -> Mapping[int, np.ndarray]:
    """The features of ``layers`` (default: all) streamed into ``cache_dir/feats-{split}-{key}/`` and
    returned as a ``LayerFeatures`` mapping (one memory-mapped layer at a time); a complete store from an
    earlier run is read as is, a part-way one continued (``cfg.cache``; otherwise rebuilt). Without a
    ``cache_dir`` the features are computed in memory (``extract``)."""
    layers = _check(model, images, layers)
    desc = f"features {split}" + (f", mask {mask_index}" if mask_index is not None else "")
    if cache_dir is None:
        return extract(model, images, tokenizer, cfg, layers=layers, progress=progress, desc=desc,
                       mask_index=mask_index)
    key = cache_key(model_identity, images, split, cfg, model.causal, layers, mask_index)
    store = FeatureStore(Path(cache_dir) / f"feats-{split}-{key}", len(images), model.config.n_embd, layers,
                         cfg.feats_dtype, key)
    return extract_to_store(model, images, tokenizer, cfg, store, progress=progress, desc=desc,
                            mask_index=mask_index)


# ---------------------------------------------------------------------------------------------- plan


MIB = 2**20
# Peak activation bytes per token of one feature-extraction batch, in units of 4 D: measured on the CPU for
# iGPT-S's width (D = 512) as the growth of peak RSS between two batch sizes, 12 to 23 x 4 D per token at
# T = 64, 256 and 1024 (docs/evaluation.md); rounded up.
ACTIVATION_WIDTHS = 20


def feature_plan(config: ModelConfig, n_images: Mapping[str, int], *, n_layers: int | None = None,
                 feats_dtype: str = "fp16", batch_size: int = 256, test_views: int = 1, concat: int = 0,
                 lbfgs: bool = True, n_train: int | None = None) -> dict[str, Any]:
    """The disk and host memory (bytes) a probe run needs, from the shapes alone (docs/evaluation.md):

    - disk: every split's N x D values per stored layer (``test_views`` copies of "test" for a mask vote);
    - extraction: fp32 weights plus one batch of activations, ~ 4 * B * T * 20 D bytes (the model holds one
      block's activations at a time, and attention kernels do not keep the T x T scores; the factor 20 is
      a rounded-up fit of measured CPU peaks, docs/evaluation.md), plus the batch's pooled features of
      every layer;
    - probe: one layer at a time; L-BFGS holds the fitting and test features in fp32 about three times
      over (raw, the validation carve, standardised), K x D wide for a concatenation of K layers; SGD
      streams minibatches, holds the test split's features once and its preconditioner's (KD)^2 second
      moment and eigenvectors (24 bytes per entry, measured: float64 accumulation and eigendecomposition,
      float32 kept)."""
    d, t, n_layer = config.n_embd, config.n_ctx, config.n_layer
    n_layers = n_layer + 1 if n_layers is None else n_layers
    item = np.dtype(DTYPES[feats_dtype]).itemsize
    rows = sum(n * (test_views if split == "test" else 1) for split, n in n_images.items())
    disk = rows * d * n_layers * item
    params = config.num_params()
    extraction = 4 * params + 4 * batch_size * t * ACTIVATION_WIDTHS * d + 4 * batch_size * d * n_layers
    width = d * max(1, concat)
    n_test = n_images.get("test", 0) * test_views
    n_fit = n_train if n_train is not None else sum(n for s, n in n_images.items() if s != "test")
    probe = 4 * width * 3 * (n_fit + n_test) if lbfgs else 4 * width * (n_test + 4 * batch_size) + 24 * width ** 2
    return {"disk_bytes": int(disk), "extraction_bytes": int(extraction), "probe_bytes": int(probe),
            "peak_bytes": int(max(extraction, probe))}


def describe_plan(plan: dict[str, Any]) -> str:
    """One line for the log: disk and memory of ``feature_plan``."""
    return (f"feature plan: {plan['disk_bytes'] / MIB:,.0f} MiB on disk; host memory beyond the Python runtime "
            f"~{plan['extraction_bytes'] / MIB:,.0f} MiB while extracting, ~{plan['probe_bytes'] / MIB:,.0f} MiB "
            "while probing")
