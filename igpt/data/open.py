"""The one front door for ``--data``: ``resolve`` decides, once, what a spec is, and the functions below open
it (or write it) whatever it is.

| kind       | what ``--data`` names                                                                      |
|------------|--------------------------------------------------------------------------------------------|
| ``digits`` | the literal word: scikit-learn's bundled 8x8 digits                                        |
| ``cache``  | a directory with ``meta.json``, written by ``igpt prepare`` (``igpt.data.cache``)         |
| ``shards`` | indexed tar shards (``igpt prepare --shards``) or WebDataset ``*.tar`` files              |
| ``openai`` | OpenAI's pre-quantized files: a prefix ``P`` of ``P_trX.npy``, or a folder holding one     |
| ``npz``    | a ``.npz`` with ``x_train`` (and ``y_train``, ``x_test``, ...)                             |
| ``cifar10``, ``cifar100``, ``stl10`` | torchvision's folders (or their parents)                        |
| ``folder`` | images: class sub-folders, ``train``/``val``/``test`` sub-folders, or flat                 |

- ``open_split``: one split as an ``ImageSet`` (arrays, or memory maps of a cache);
- ``open_labelled``: a labelled split whose ids fit a checkpoint's tokenizer (probes, fine-tuning);
- ``open_eval``: the split a model is scored or completed on (test when there is one, else val);
- ``open_training``: the training stream and validation set of a pretraining run;
- ``prepare``: a cache or shards written from any other kind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from igpt.atomic import check_output
from igpt.config import check_seed
from igpt.data import cache, shard_streams, shard_writer, sources
from igpt.arrays import load_npy, npz_array, open_npz
from igpt.data.augment import FolderImages
from igpt.data.imageset import ImageSet, check_ids
from igpt.data.shards import ShardIndex, is_shard_dir
from igpt.data.splits import carve_val, check_names, first_available, sample_indices, split_indices
from igpt.data.streams import BatchStream, FolderStream
from igpt.tokenizers import AnyTokenizer

log = logging.getLogger(__name__)

FORMATS = ("'digits'; a directory written by 'igpt prepare' (a cache or shards); WebDataset .tar shards; an "
           "OpenAI prefix P with P_trX.npy; a .npz with x_train; a CIFAR-10/100 python folder; an STL-10 binary "
           "folder; a folder of images (class sub-folders, train/val/test sub-folders, or flat)")
PALETTE_FIT_IMAGES = 2000  # centre crops a palette is fitted on when training streams its images
_TORCHVISION = (("cifar10", "data_batch_1", "cifar-10-batches-py"), ("cifar100", "train", "cifar-100-python"),
                ("stl10", "train_X.bin", "stl10_binary"))


@dataclass(frozen=True)
class DataSpec:
    kind: str  # see the module docstring
    path: str  # the file, folder or (openai) prefix to read
    spec: str  # what the user wrote, for messages


def resolve(spec: str | Path) -> DataSpec:
    """What ``--data spec`` is; an error naming it when it is nothing igpt reads."""
    spec = str(spec)
    if spec == "digits":  # the word; a folder called digits is ./digits
        return DataSpec("digits", spec, spec)
    path = Path(spec)
    if cache.is_cache(path):
        return DataSpec("cache", spec, spec)
    if is_shard_dir(path):
        return DataSpec("shards", spec, spec)
    if Path(f"{spec}_trX.npy").is_file():
        return DataSpec("openai", spec, spec)
    if path.is_file() and path.suffix.lower() == ".npz":
        return DataSpec("npz", spec, spec)
    if not path.is_dir():
        what = "no such file or directory" if not path.exists() else "not a recognised data file"
        raise ValueError(f"--data {spec}: {what}; accepted: {FORMATS}")
    for kind, marker, child in _TORCHVISION:
        for d in (path, path / child):
            if (d / marker).is_file():
                return DataSpec(kind, str(d), spec)
    openai = sorted(path.glob("*_trX.npy"))
    if len(openai) > 1:
        raise ValueError(f"--data {spec}: several OpenAI files ({', '.join(p.name for p in openai)}); pass the "
                         "prefix, e.g. DIR/cifar10")
    if openai:
        return DataSpec("openai", str(openai[0])[:-len("_trX.npy")], spec)
    subdirs, images = sources.folder_entries(path)
    if not subdirs and not images:
        raise ValueError(f"--data {spec}: no images or known dataset files found; accepted: {FORMATS}")
    return DataSpec("folder", spec, spec)


# ---- splits as arrays


def open_split(data: str | Path | DataSpec, split: str, *, n_px: int, val_fraction: float = 0.1, seed: int = 0,
               resize: str = "center", on_error: str = "stop") -> ImageSet:
    """One split of ``--data`` as an ImageSet. A cache keeps the carve, seed and resize it was prepared
    with; shards are decoded into memory (training streams them instead, ``open_training``)."""
    return _first_split(data, (split,), n_px, val_fraction, seed, resize, on_error)[0]


def _first_split(data: str | Path | DataSpec, names: tuple[str, ...], n_px: int, val_fraction: float, seed: int,
                 resize: str, on_error: str = "stop") -> tuple[ImageSet, str]:
    """(the first split of ``names`` that ``data`` has, its name), from one read of the source."""
    check_names(names)  # before any reading
    d = data if isinstance(data, DataSpec) else resolve(data)
    if d.kind == "cache":
        return cache.open_cache(Path(d.path), names, n_px)
    if d.kind == "shards":
        return shard_streams.open_shard_split(d.path, names, n_px)
    splits, _ = carve_val(sources.read(d.kind, d.path, n_px, resize=resize, on_error=on_error), val_fraction, seed)
    split = first_available(names, sorted(splits), d.spec, val_fraction)
    s = splits[split]
    return ImageSet(n_px, s.pixels, s.ids, s.labels, s.classes, None, d.spec), split


def open_labelled(data: str | Path, split: str, *, n_px: int, tokenizer: AnyTokenizer, val_fraction: float = 0.1,
                  seed: int = 0, resize: str = "center", any_palette: bool = False) -> ImageSet:
    """A labelled split whose ids fit ``tokenizer`` (``check_ids``): for probes and fine-tuning."""
    images = open_split(data, split, n_px=n_px, val_fraction=val_fraction, seed=seed, resize=resize)
    if images.labels is None:
        raise ValueError(f"--data {data}: the {split!r} split has no labels; a probe or fine-tune needs labelled "
                         "images (class sub-folders, y_train/y_test arrays, ...)")
    check_ids(images, tokenizer, any_palette=any_palette)
    return images


def open_eval(data: str | Path, split: str | None, *, n_px: int, tokenizer: AnyTokenizer, val_fraction: float = 0.1,
              seed: int = 0, resize: str = "center", any_palette: bool = False) -> tuple[ImageSet, str]:
    """(images, split name) that a model is scored or completed on: ``split``, or test when the data has
    one and val otherwise. Their ids must fit ``tokenizer``."""
    images, name = _first_split(data, (split,) if split else ("test", "val"), n_px, val_fraction, seed, resize)
    check_ids(images, tokenizer, any_palette=any_palette)
    return images, name


def lossless_mask(data: str | Path, n_test: int) -> np.ndarray:
    """Bool (n_test,) marking the bit-exact test images of ../shared/data/cifar10*.npz (``test_lossless``):
    from the npz itself, from ``test_lossless.npy`` beside a cache's arrays, or from the npz a cache was
    prepared from (its meta.json ``source``)."""
    d = resolve(data)
    candidates = [Path(d.path)] if d.kind == "npz" else []
    if d.kind == "cache":
        source = Path(cache.read_meta(Path(d.path)).get("source", ""))
        candidates += [Path(d.path) / "test_lossless.npy", source if source.is_absolute() else Path.cwd() / source]
    for c in candidates:
        if c.is_file() and c.suffix == ".npy":
            mask = load_npy(c)
        elif c.is_file() and c.suffix == ".npz":
            with open_npz(c) as z:
                if "test_lossless" not in z.files:
                    continue
                mask = npz_array(z, "test_lossless", c)
        else:
            continue
        if mask.shape != (n_test,) or mask.dtype != bool:
            raise ValueError(f"{c}: test_lossless is {mask.dtype} {mask.shape}, the test split has {n_test} images")
        return mask
    raise ValueError(f"--eval-subset lossless: --data {data} has no test_lossless array (an npz such as "
                     "../shared/data/cifar10.npz, or a cache prepared from one)")


# ---- sizes: may these images be enlarged?

NATIVE_SIDES = {"digits": 8, "cifar10": 32, "cifar100": 32, "stl10": 96}  # the fixed image sides of these kinds


def _too_small(d: DataSpec, n_px: int) -> str | None:
    """What in ``d`` is smaller than n_px x n_px (a file, or the data's image size), or None."""
    if d.kind in NATIVE_SIDES:
        side = NATIVE_SIDES[d.kind]
        return f"--data {d.spec} ({side}x{side} images)" if side < n_px else None
    if d.kind == "npz":
        with open_npz(d.path) as z:
            shape = npz_array(z, "x_train", d.path).shape  # (N, H, W[, 3])
        return f"--data {d.spec} ({shape[1]}x{shape[2]} images)" if min(shape[1:3]) < n_px else None
    if d.kind == "folder":
        for path in sources.walk_images(Path(d.path)):
            with Image.open(path) as img:  # reads the header only
                if min(img.size) < n_px:
                    return f"{path} ({img.size[0]}x{img.size[1]})"
    return None  # caches and shards hold one size, checked when opened; OpenAI's files hold ids


def check_upscale(data: str | Path, n_px: int, upscale: bool) -> None:
    """Images smaller than ``n_px`` on their short side are enlarged only with
    ``upscale``; otherwise a one-line error names the first such file (or the data whose images all are)."""
    if upscale:
        return
    small = _too_small(resolve(data), n_px)
    if small is not None:
        raise ValueError(f"{small} is smaller than the {n_px}x{n_px} images asked for; pass --upscale to enlarge "
                         f"images (bicubic), or use a smaller side")


# ---- identity: has the data changed?

_SAMPLE = 1 << 16  # bytes read from each end of a file: enough to tell two datasets apart, cheap for big ones
_SAMPLED_FILES = 1000  # in a folder of more files than this, names and sizes alone stand for the contents


def identity(data: str | Path | DataSpec) -> dict[str, Any]:
    """What ``data`` is, cheaply: its kind and a digest of its files' names, sizes and (for all but folders
    of many files) their first and last 64 KiB, which covers a cache's meta.json, a shard index and every
    small file whole. A run records it so that a dataset replaced between a kill and a resume is noticed."""
    d = data if isinstance(data, DataSpec) else resolve(data)
    if d.kind == "digits":
        return {"kind": d.kind, "digest": "digits"}
    path = Path(d.path)
    if d.kind == "openai":
        files = sorted(path.parent.glob(f"{path.name}_*.npy"))
        root = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        root = path
    else:
        files, root = [path], path.parent
    digest = hashlib.sha256()
    sample = len(files) <= _SAMPLED_FILES
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root)}\0{size}\0".encode())
        if sample:
            with open(f, "rb") as fh:
                digest.update(fh.read(_SAMPLE))
                if size > 2 * _SAMPLE:
                    fh.seek(-_SAMPLE, os.SEEK_END)
                    digest.update(fh.read(_SAMPLE))
    return {"kind": d.kind, "files": len(files), "digest": digest.hexdigest()[:16]}


# ---- writing: caches and shards


def prepare(data: str | Path, out_dir: str | Path, *, n_px: int, tokenizer: AnyTokenizer | None = None, shards: int = 0,
            val_fraction: float = 0.1, seed: int = 0, resize: str = "center", on_error: str = "stop",
            overwrite: bool = False, any_palette: bool = False, upscale: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Write ``data`` as a cache (``igpt.data.cache``; ids with ``tokenizer``, else
    pixels) or, with ``shards`` images per shard, as tar shards (``igpt.data.shard_writer``). Returns their
    metadata. ``n_px`` is the image side: a VQ-VAE tokenizer needs its own input side, and images smaller than
    that are enlarged only with ``upscale`` (``check_upscale``). Ids that are read, not made (OpenAI's
    files), must fit ``tokenizer`` (``check_ids``), whose fingerprint the cache records. An existing
    ``out_dir`` is refused unless ``overwrite``."""
    check_seed("--seed", seed)  # the carve's default_rng would refuse a negative one without naming it
    d = resolve(data)
    check_output(out_dir, "--out", overwrite=overwrite)
    side = getattr(tokenizer, "input_side", None)  # None for a palette, or any quantizer with its interface
    if side is not None:  # a VQ-VAE reads one image side only
        if n_px != side:
            raise ValueError(f"--n-px {n_px}: tokenizer {tokenizer.describe()} reads {tokenizer.input_side}x"
                             f"{tokenizer.input_side} images; prepare with --n-px {tokenizer.input_side}")
        check_upscale(d.spec, n_px, upscale)
    if d.kind in ("cache", "shards"):
        what = "a prepared cache" if d.kind == "cache" else "a shards directory"
        raise ValueError(f"--data {data} is already {what}; use it directly")
    created = not Path(out_dir).exists()
    try:
        return _prepare(d, out_dir, n_px, tokenizer, shards, val_fraction, seed, resize, on_error, any_palette,
                        progress)
    except Exception:
        if created:  # a bad input (an unreadable image, ...) leaves no half-made output behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _prepare(d: DataSpec, out_dir: str | Path, n_px: int, tokenizer: AnyTokenizer | None, shards: int,
             val_fraction: float, seed: int, resize: str, on_error: str, any_palette: bool,
             progress: bool) -> dict[str, Any]:
    if shards:
        if tokenizer is not None:
            raise ValueError("--shards stores images, not ids: leave out --tokenizer (training quantizes)")
        if d.kind == "folder":  # files are copied as they are, at full resolution
            return shard_writer.write_folder_shards(Path(d.path), out_dir, per_shard=shards, val_fraction=val_fraction,
                                                    seed=seed, on_error=on_error, progress=progress)
        raw = sources.read(d.kind, d.path, n_px, resize=resize, on_error=on_error)
        return shard_writer.write_array_shards(raw, out_dir, source=d.spec, n_px=n_px, per_shard=shards,
                                               val_fraction=val_fraction, seed=seed, progress=progress)
    raw = sources.read(d.kind, d.path, n_px, resize=resize, on_error=on_error)
    if tokenizer is not None:  # before the cache records the tokenizer's fingerprint for ids it did not make
        for s in raw.values():
            check_ids(ImageSet(n_px, None, s.ids, None, None, None, d.spec), tokenizer, any_palette=any_palette)
    return cache.write_cache(raw, out_dir, source=d.spec, n_px=n_px, tokenizer=tokenizer, val_fraction=val_fraction,
                             seed=seed, resize=resize, progress=progress)


# ---- training


@dataclass
class TrainingData:
    fit_set: ImageSet  # images to fit or check the tokenizer on (all of train when it is in memory)
    n_train: int  # training images (one epoch)
    val_set: ImageSet | None  # None without a validation split, or when not asked for
    make_stream: Callable[[AnyTokenizer], Any]  # tokenizer -> stream with next() -> ids (rows, T) on the device


def open_training(data: str | Path, n_px: int, *, batch_size: int, seed: int, device: torch.device,
                  augment: str = "none", workers: int = 0, val_fraction: float = 0.1, resize: str = "center",
                  validate: bool = True, val_images: int = 0, rows: slice = slice(None),
                  any_palette: bool = False) -> TrainingData:
    """The data of a pretraining run: ``batch_size`` images a micro-batch, ordered and augmented from
    ``seed``; ``rows`` is this process's share of each micro-batch. Shards stream from tar files decoded in
    ``workers`` processes; an image folder with ``augment="imagenet"`` likewise; everything else is read
    as arrays (memory-mapped for a cache). ``validate`` opens the val split too (at most ``val_images``
    of a shards directory's, drawn with the seed; 0 = all)."""
    d = resolve(data)
    if d.kind == "shards":
        return _shard_training(d, n_px, batch_size, seed, device, augment, workers, validate, val_images, rows)
    if augment == "imagenet":
        return _folder_training(d, n_px, batch_size, seed, device, workers, val_fraction, validate, rows)
    kw = {"n_px": n_px, "val_fraction": val_fraction, "seed": seed, "resize": resize}
    train = open_split(d, "train", **kw)
    val = None
    if validate:
        try:
            val = open_split(d, "val", **kw)
        except ValueError as e:
            log.warning("no validation split, so no validation loss: %s", e)

    def make_stream(tokenizer: AnyTokenizer) -> BatchStream:
        if val is not None:  # the run checks train against its tokenizer; val is first read at an evaluation
            check_ids(val, tokenizer, any_palette=any_palette)
        return BatchStream(train, batch_size, seed, tokenizer, device, augment, rows)

    return TrainingData(train, len(train), val, make_stream)


def _shard_training(d: DataSpec, n_px: int, batch_size: int, seed: int, device: torch.device, augment: str,
                    workers: int, validate: bool, val_images: int, rows: slice) -> TrainingData:
    index = ShardIndex.open(d.path)
    shard_streams.check_n_px(index, n_px, augment)
    train = index.split("train")
    fit_idx = sample_indices(len(train), PALETTE_FIT_IMAGES, seed)
    fit = ImageSet(n_px, shard_streams.decode_images(train, n_px, fit_idx), None, None, None, None, d.spec)
    val = None
    if validate and "val" not in index.splits:
        log.warning("%s: no val shards, so no validation loss", d.spec)
    elif validate:
        v = index.split("val")
        n = len(v) if val_images == 0 else min(len(v), val_images)
        val = ImageSet(n_px, shard_streams.decode_images(v, n_px, sample_indices(len(v), n, seed)), None, None,
                       None, None, f"{d.spec} (val)")
    return TrainingData(fit, len(train), val, lambda tokenizer: shard_streams.ShardStream(
        train, batch_size, seed, tokenizer, device, n_px, augment, workers, rows))


def _folder_training(d: DataSpec, n_px: int, batch_size: int, seed: int, device: torch.device, workers: int,
                     val_fraction: float, validate: bool, rows: slice) -> TrainingData:
    """The paper's ImageNet-style augmentation, decoded in workers: the training folder (``root/train`` when
    the root has split sub-folders), its validation images centre-cropped (``root/val``, else
    ``val_fraction`` of the training folder carved with ``seed``)."""
    if d.kind != "folder":
        raise ValueError(f"--augment imagenet needs --data to be an image folder (or shards of one); {d.spec} "
                         f"is {d.kind} data")
    root = Path(d.path)
    has_splits = bool(sources.split_folders(root))
    train_root = root / "train" if has_splits else root
    images = FolderImages(train_root, n_px, augment="imagenet", seed=seed)
    view = FolderImages(train_root, n_px, augment="center", seed=seed)
    train_idx, val, val_idx = np.arange(len(images)), None, None
    if has_splits and (root / "val").is_dir():
        val = open_split(d, "val", n_px=n_px) if validate else None
    elif val_fraction > 0:
        train_idx, val_idx = split_indices(len(images), val_fraction, seed)
    if validate and val_idx is not None:
        labels = None if images.labels is None else images.labels[val_idx]
        pixels = np.stack([view[int(i)][0].numpy() for i in val_idx])
        val = ImageSet(n_px, pixels, None, labels, images.classes, None, f"{d.spec} (val carve)")
    fit_idx = np.random.default_rng(seed).permutation(train_idx)[:PALETTE_FIT_IMAGES]
    fit = ImageSet(n_px, np.stack([view[int(i)][0].numpy() for i in fit_idx]), None, None, None, None, d.spec)
    return TrainingData(fit, len(train_idx), val, lambda tokenizer: FolderStream(
        images, train_idx, batch_size, seed, tokenizer, device, workers, rows))
