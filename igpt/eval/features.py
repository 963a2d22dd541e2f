"""Probe features of every layer in one batched pass over a split, cached on disk (paper section 2.3).

For layer l < L the feature is block l's first norm applied to the residual stream entering it,
``ln_1(h^l)``; for l = L it is the final norm ``ln_f(h^L)``; both mean-pooled over the T positions
(``GPT.layer_features``). All L + 1 layers come out of one forward pass per batch, so probing every layer
costs one pass over the data; the result is written to ``feats-{split}-{key}.npz`` (one array per layer)
and reused by any later run whose inputs give the same key.

The key hashes what the features depend on: the checkpoint (path, step, size and mtime of its weights,
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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt.config import arg
from igpt.data.cache import ImageSet, check_palette, open_split
from igpt.data.streams import to_ids
from igpt.model import GPT
from igpt.objectives import sample_keep_mask
from igpt.palette import Palette
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype


@dataclass(frozen=True)
class FeatureConfig:
    """How features are read out of a model."""

    batch_size: int = arg(256, "images per forward pass when extracting features")
    device: str = arg("auto", "'auto' (CUDA when present), 'cpu', 'cuda', ... (extraction and the probe)")
    dtype: str = arg("auto", "autocast dtype: 'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'",
                     choices=("auto", "bf16", "fp32"))
    bert_mask: bool = arg(True, "BERT checkpoints: mask the inputs as in training when extracting features "
                          "(the paper does); --no-bert-mask reads them unmasked")
    mask_prob: float = arg(0.15, "BERT: probability that a position is masked")
    n_masks: int = arg(1, "BERT: average the features over this many independent masks (the paper "
                       "ensembled 5, by a vote of predictions)")
    flip_average: bool = arg(False, "average each image's features with those of its mirror image "
                             "(test-time augmentation; not in the paper)")
    mask_seed: int = arg(0, "seed of the BERT masks")
    cache: bool = arg(True, "reuse features cached in --out by an earlier run with identical inputs")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if self.n_masks < 1:
            raise ValueError(f"--n-masks must be >= 1, got {self.n_masks}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")


def base_objective(config: dict[str, Any]) -> str:
    """'ar' or 'bert': how a checkpoint's model reads images (a fine-tuned one records its base)."""
    objective = config.get("objective", "ar")
    if objective == "finetune":
        objective = config.get("base_objective", "ar")
    if objective not in ("ar", "bert"):
        raise ValueError(f"checkpoint records objective {objective!r}; expected 'ar' or 'bert'")
    return objective


# ---------------------------------------------------------------------------------------------- data


def take(images: ImageSet, index: np.ndarray) -> ImageSet:
    """The images ``index`` of a split, as a new (in-memory) ImageSet."""
    pick = (lambda a: None if a is None else np.asarray(a[index]))
    return ImageSet(images.n_px, pick(images.pixels), pick(images.ids), pick(images.labels), images.classes,
                    images.palette_fingerprint, images.source)


def open_labelled(data: str, split: str, *, n_px: int, palette: Palette, val_fraction: float = 0.1,
                  seed: int = 0, resize: str = "center") -> ImageSet:
    """A labelled split checked against a checkpoint's palette and resolution: unlabelled data, ids made
    by another palette, ids outside the palette or a cache prepared at another n_px are clear errors."""
    images = open_split(data, split, n_px=n_px, val_fraction=val_fraction, seed=seed, resize=resize)
    if images.labels is None:
        raise ValueError(f"--data {data}: the {split!r} split has no labels; a probe or fine-tune needs labelled "
                         "images (class sub-folders, y_train/y_test arrays, ...)")
    check_palette(images, palette)
    if images.ids is not None and len(images) and int(np.max(images.ids)) >= palette.k:
        raise ValueError(f"--data {data}: holds id {int(np.max(images.ids))} but the checkpoint's palette has "
                         f"only {palette.k} colours; use the palette the data was prepared with")
    return images


def lossless_mask(data: str, n_test: int) -> np.ndarray:
    """Bool (n_test,) marking the bit-exact test images of ../shared/data/cifar10*.npz (``test_lossless``).
    Read from the npz itself, from ``test_lossless.npy`` in a prepared cache, or from the npz a cache was
    prepared from (its meta.json ``source``)."""
    path = Path(data)
    candidates = [path] if path.suffix == ".npz" else [path / "test_lossless.npy"]
    if (path / "meta.json").is_file():
        source = Path(json.loads((path / "meta.json").read_text()).get("source", ""))
        candidates.append(source if source.is_absolute() else Path.cwd() / source)
    for c in candidates:
        if c.is_file() and c.suffix == ".npy":
            mask = np.load(c)
        elif c.is_file() and c.suffix == ".npz":
            with np.load(c) as z:
                mask = z["test_lossless"] if "test_lossless" in z.files else None
        else:
            continue
        if mask is not None:
            if mask.shape != (n_test,) or mask.dtype != bool:
                raise ValueError(f"{c}: test_lossless is {mask.dtype} {mask.shape}, the test split has {n_test} "
                                 "images")
            return mask
    raise ValueError(f"--eval-subset lossless: --data {data} has no test_lossless array (an npz such as "
                     "../shared/data/cifar10.npz, or a cache prepared from one)")


# ---------------------------------------------------------------------------------------------- extraction


def _split_feats(model: GPT, ids: torch.Tensor, cfg: FeatureConfig, objective: str, layers: list[int],
                 batch_start: int) -> dict[int, torch.Tensor]:
    """{layer: (B, D)} for one batch of ids (B, T), averaged over masks and mirror images as configured."""
    B, T = ids.shape
    views = [ids]
    if cfg.flip_average:
        n = model.config.n_px
        views.append(ids.view(B, n, n).flip(2).reshape(B, T))  # raster order: flip each row
    masked = objective == "bert" and cfg.bert_mask
    total: dict[int, torch.Tensor] = {}
    count = 0
    for k in range(cfg.n_masks if masked else 1):
        keep = None
        if masked:  # the same mask for an image and its mirror: only the content differs
            keep = sample_keep_mask((B, T), cfg.mask_prob, derived_generator(cfg.mask_seed, k, batch_start),
                                    ids.device)
        for view in views:
            feats = model.layer_features(view, layers, causal=objective == "ar", keep=keep)
            for layer, f in feats.items():
                total[layer] = total[layer] + f if layer in total else f
            count += 1
    return {layer: f / count for layer, f in total.items()}


@torch.no_grad()
def extract(model: GPT, images: ImageSet, palette: Palette, cfg: FeatureConfig = FeatureConfig(), *,
            objective: str = "ar", layers: list[int] | None = None, progress: bool = True,
            desc: str = "features") -> dict[int, np.ndarray]:
    """{layer: feats (N, D) float32} of every image of ``images`` (default layers 0..L), batched, under
    bf16 autocast on GPU. The model is moved to the configured device and put in eval mode."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = model.to(device).eval()
    palette = palette.to(device)
    layers = list(range(model.config.n_layer + 1)) if layers is None else sorted(set(layers))
    if len(images) == 0:
        raise ValueError(f"--data {images.source}: the split is empty")
    n, d = len(images), model.config.n_embd
    out = {layer: np.empty((n, d), np.float32) for layer in layers}
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, n, cfg.batch_size):
            index = np.arange(start, min(n, start + cfg.batch_size))
            ids = to_ids(images, index, palette, device)  # (B, T)
            with autocast(device, dtype):
                feats = _split_feats(model, ids, cfg, objective, layers, start)
            for layer, f in feats.items():
                out[layer][index] = f.float().cpu().numpy()
            bar.update(len(index))
    return out


# ---------------------------------------------------------------------------------------------- cache


def checkpoint_identity(ckpt_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What names a checkpoint's weights cheaply: checkpoint directories are written once, atomically."""
    weights = ckpt_dir / "model.safetensors"
    stat = weights.stat()
    return {"checkpoint": str(ckpt_dir.resolve()), "step": config.get("step"), "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "palette": config.get("palette_fingerprint")}


def _content_hash(images: ImageSet) -> str:
    h = hashlib.blake2b(digest_size=16)
    x = images.pixels if images.pixels is not None else images.ids
    for start in range(0, len(x), 8192):  # chunks, so a memory-mapped split is never copied whole
        h.update(np.ascontiguousarray(x[start:start + 8192]).tobytes())
    if images.labels is not None:
        h.update(np.asarray(images.labels, np.int64).tobytes())
    return h.hexdigest()


def cache_key(model_identity: dict[str, Any], images: ImageSet, split: str, cfg: FeatureConfig,
              objective: str, layers: list[int] | None) -> str:
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("cache", "device")}
    if not (objective == "bert" and cfg.bert_mask):
        options = {k: v for k, v in options.items() if k not in ("mask_prob", "n_masks", "mask_seed", "batch_size")}
    parts = {"model": model_identity, "data": _content_hash(images), "split": split, "n_px": images.n_px,
             "objective": objective, "layers": layers, "options": options}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_extract(model: GPT, images: ImageSet, palette: Palette, cfg: FeatureConfig, *, split: str,
                   model_identity: dict[str, Any], cache_dir: str | Path | None, objective: str = "ar",
                   layers: list[int] | None = None, progress: bool = True) -> dict[int, np.ndarray]:
    """``extract``, reading ``cache_dir/feats-{split}-{key}.npz`` when an earlier run wrote it (and
    ``cfg.cache``), writing it otherwise (atomically: a temporary file, then a rename)."""
    if cache_dir is None:
        return extract(model, images, palette, cfg, objective=objective, layers=layers, progress=progress,
                       desc=f"features {split}")
    key = cache_key(model_identity, images, split, cfg, objective, layers)
    path = Path(cache_dir) / f"feats-{split}-{key}.npz"
    if cfg.cache and path.is_file():
        with np.load(path) as z:
            return {int(name.split("_")[1]): z[name] for name in z.files}
    feats = extract(model, images, palette, cfg, objective=objective, layers=layers, progress=progress,
                    desc=f"features {split}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # through a handle: np.savez would append .npz to the temporary name
            np.savez(f, **{f"layer_{layer}": x for layer, x in feats.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return feats
