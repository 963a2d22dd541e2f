"""``igpt prepare --shards N``: write an image dataset as indexed WebDataset tar shards (format: ``igpt.data.shards``).

Images are written in a seeded random order, so every shard is a random sample of its split. An image
folder's files are stored as they are (full resolution, for the ImageNet-style augmentation); images of
an array source (npz, CIFAR, digits, ...) as lossless PNG at ``--n-px``. Every file goes through a
temporary name and ``os.replace``; ``shards.json`` last, so a directory without it is never taken for a
complete dataset.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from igpt.atomic import replacing, write_json
from igpt.data.images import DECODE_ERRORS
from igpt.data.shards import FORMAT_VERSION, SHARDS_FILE, scan_tar
from igpt.data.sources import list_image_folder, split_folders
from igpt.data.splits import RawSplit, carve_val

log = logging.getLogger(__name__)

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}  # seeds the write order of each split
_CHUNK = 64  # images read or encoded at a time while writing: memory stays far below one shard


@dataclass
class _Plan:
    """One split to write: ``load(i)`` -> (bytes, ext) or None (unreadable, skipped) for i in 0..n-1."""

    n: int
    load: Callable[[int], tuple[bytes, str] | None]
    labels: np.ndarray | None
    keys: np.ndarray  # (n,) the source position of each image, used as its tar key

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray) -> "_Plan":
        """The images ``idx`` of this split (``igpt.data.splits.carve_val`` carves with it)."""
        return _Plan(len(idx), lambda i: self.load(int(idx[i])), None if self.labels is None else self.labels[idx],
                     self.keys[idx])


def _file_loader(paths: list[Path], on_error: str) -> Callable[[int], tuple[bytes, str] | None]:
    def load(i: int) -> tuple[bytes, str] | None:
        blob = paths[i].read_bytes()
        try:  # decoded once here (JPEG at reduced scale: fast), so a bad file fails now, not mid-training
            with Image.open(io.BytesIO(blob)) as img:
                img.draft(None, (64, 64))
                img.load()
        except DECODE_ERRORS as e:
            if on_error == "stop":
                raise ValueError(f"{paths[i]} is not a readable image: {e}") from e
            log.warning("skipping unreadable image %s: %s", paths[i], e)
            return None
        return blob, paths[i].suffix.lower().lstrip(".")

    return load


def _png_loader(pixels: np.ndarray) -> Callable[[int], tuple[bytes, str]]:
    def load(i: int) -> tuple[bytes, str]:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels[i])).save(buf, format="PNG")
        return buf.getvalue(), "png"

    return load


def _folder_plans(root: Path, on_error: str) -> tuple[dict[str, _Plan], list[str] | None]:
    """Plans of an image folder: one per train/val/test sub-folder, or "train" for the folder itself."""
    dirs = split_folders(root)
    # train/val/test share one class list (the sorted union of their class folders), as read_source does
    shared = sorted({c.name for d in dirs for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
    plans, classes = {}, None
    for d in dirs or [root]:
        paths, labels, own = list_image_folder(d)
        if labels is not None and shared:
            labels = np.asarray([shared.index(c) for c in own], np.int64)[labels]
        if labels is not None and classes is None:
            classes = shared or own
        plans[d.name if dirs else "train"] = _Plan(len(paths), _file_loader(paths, on_error), labels,
                                                   np.arange(len(paths)))
    return plans, classes


def _loaded(pool: ThreadPoolExecutor, plan: _Plan, pick: np.ndarray) -> Iterator[tuple[int, tuple[bytes, str] | None]]:
    for start in range(0, len(pick), _CHUNK):
        chunk = [int(i) for i in pick[start:start + _CHUNK]]
        yield from zip(chunk, pool.map(plan.load, chunk))


def _add_member(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(blob), 0o644, 0  # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(blob))


class _NothingWritten(Exception):
    """Every image of a shard was skipped: no shard is written."""


def _write_shard(out: Path, stem: str, items: Iterator, plan: _Plan, bar) -> dict | None:
    """Write one tar and its index atomically; None when every image was skipped."""
    try:
        with replacing(out / f"{stem}.tar") as tmp_tar, replacing(out / f"{stem}.idx.npy") as tmp_idx:
            n = 0
            with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tar:
                for i, loaded in items:
                    bar.update(1)
                    if loaded is None:
                        continue
                    key = f"{int(plan.keys[i]):09d}"
                    _add_member(tar, f"{key}.{loaded[1]}", loaded[0])
                    if plan.labels is not None:
                        _add_member(tar, f"{key}.cls", str(int(plan.labels[i])).encode())
                    n += 1
            if n == 0:
                raise _NothingWritten
            rows, _ = scan_tar(tmp_tar)  # the index is what a reader of the finished tar would find
            if len(rows) != n:
                raise ValueError(f"{out / stem}.tar: wrote {n} images but its headers list {len(rows)}")
            with open(tmp_idx, "wb") as f:
                np.save(f, rows, allow_pickle=False)
            size = tmp_tar.stat().st_size
    except _NothingWritten:
        return None
    return {"tar": f"{stem}.tar", "index": f"{stem}.idx.npy", "n": n, "bytes": size}


def _write_split(out: Path, name: str, plan: _Plan, per_shard: int, seed: int, pool: ThreadPoolExecutor,
                 bar) -> dict:
    order = np.random.default_rng([seed, _SPLIT_CODES.get(name, 9)]).permutation(plan.n)  # seeded random order
    shards = []
    for start in range(0, plan.n, per_shard):
        pick = order[start:start + per_shard]
        entry = _write_shard(out, f"{name}-{len(shards):06d}", _loaded(pool, plan, pick), plan, bar)
        if entry is not None:
            shards.append(entry)
    total = sum(s["n"] for s in shards)
    if total == 0:
        raise ValueError(f"--data: none of the {plan.n} {name} images could be read")
    return {"n": total, "labeled": plan.labels is not None, "shards": shards}


def write_folder_shards(root: Path, out_dir: str | os.PathLike, *, per_shard: int, val_fraction: float = 0.1,
                        seed: int = 0, on_error: str = "stop", progress: bool = True) -> dict:
    """An image folder's files, copied as they are (full resolution), into tar shards of ``per_shard``
    images. Returns the contents of shards.json."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"--on-error must be 'stop' or 'skip', got {on_error!r}")
    plans, classes = _folder_plans(root, on_error)
    return _write_all(plans, classes, out_dir, n_px=None, source=str(root), per_shard=per_shard,
                      val_fraction=val_fraction, seed=seed, progress=progress)


def write_array_shards(raw: dict[str, RawSplit], out_dir: str | os.PathLike, *, source: str, n_px: int,
                       per_shard: int, val_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Splits read at ``n_px`` (npz, CIFAR, digits, ...) as lossless PNGs in tar shards of ``per_shard``
    images. Returns the contents of shards.json."""
    if any(s.pixels is None for s in raw.values()):
        raise ValueError(f"--data {source} holds ids, not images: --shards stores images; use prepare "
                         "without --shards")
    plans = {name: _Plan(len(s), _png_loader(s.pixels), s.labels, np.arange(len(s))) for name, s in raw.items()}
    classes = next((s.classes for s in raw.values() if s.classes is not None), None)
    return _write_all(plans, classes, out_dir, n_px=n_px, source=source, per_shard=per_shard,
                      val_fraction=val_fraction, seed=seed, progress=progress)


def _write_all(plans: dict[str, _Plan], classes: list[str] | None, out_dir: str | os.PathLike, *, n_px: int | None,
               source: str, per_shard: int, val_fraction: float, seed: int, progress: bool) -> dict:
    from tqdm.auto import tqdm  # lazy: only writing shows a progress bar

    if per_shard < 1:
        raise ValueError(f"--shards must be >= 1 images per shard, got {per_shard}")
    plans, carved = carve_val(plans, val_fraction, seed)  # the carve of igpt prepare: the same indices
    plans.pop("train_all", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARDS_FILE).unlink(missing_ok=True)  # from here until the end, out is not a complete dataset
    for old in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].*"):  # shards of an earlier write, which may be more
        if old.name.endswith((".tar", ".idx.npy")):
            old.unlink()
    splits = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=sum(p.n for p in plans.values()), desc=f"shards {out}", unit="img", disable=not progress) as bar:
        for name, plan in plans.items():
            splits[name] = _write_split(out, name, plan, per_shard, seed, pool, bar)
    meta = {"format_version": FORMAT_VERSION, "n_px": n_px,
            "encoding": "original files" if n_px is None else "png", "images_per_shard": per_shard,
            "classes": classes, "source": source, "val_fraction": val_fraction, "seed": seed,
            "val_carved": carved, "splits": splits}
    write_json(out / SHARDS_FILE, meta)  # last: its presence means every shard above is complete
    return meta
