"""Sharded image datasets for data larger than memory: the writer (``igpt prepare --shards N``) and the index.

A shards directory is WebDataset-compatible::

    train-000000.tar        N images as members ``{key}.{ext}``, plus ``{key}.cls`` (the label as text)
                            when labelled; key = the image's position in its source split
    train-000000.idx.npy    int64 (n, 3): (byte offset, size, label or -1) of each image member, so an
                            image is one positional read, with no scanning
    val-000000.tar, ...     the validation split (the source's own, or carved as ``igpt prepare`` does)
    shards.json             written last: splits -> shard files, counts and sizes, n_px, classes, source

Images are written in a seeded random order, so every shard is a random sample of its split. An image
folder's files are stored as they are (full resolution, for the ImageNet-style augmentation); images of
an array source (npz, CIFAR, digits, ...) as lossless PNG at ``--n-px``. Every file goes through a
temporary name and ``os.replace``; ``shards.json`` last, so a directory without it is never taken for a
complete dataset.

``ShardIndex.open(dir)`` also reads plain WebDataset tar shards (a directory of ``*.tar``, no index): the
member index is built by reading the tar headers at open time; a split is named by a ``train``/``val``/
``test`` token in the file name (all files are "train" when none has one); labels come from ``.cls``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from igpt.data import split_indices
from igpt.images import DECODE_ERRORS
from igpt.sources import list_image_folder, read_source, split_folders

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"
FORMAT_VERSION = 1
TAR_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}  # seeds the write order of each split
_SPLIT_TOKEN = re.compile(r"(?:^|[-_.])(train|val|valid|validation|test)(?=[-_.\d]|$)")
_CHUNK = 64  # images read or encoded at a time while writing: memory stays far below one shard


def is_shard_dir(data: str | os.PathLike) -> bool:
    """Whether ``data`` is a shards directory: ours (``shards.json``, or index files of an interrupted
    write, which opening then reports), or WebDataset's (``*.tar`` files, no sub-folders, no images)."""
    path = Path(data)
    if not path.is_dir():
        return False
    if (path / SHARDS_FILE).is_file():
        return True
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if any(e.name.endswith(".idx.npy") for e in entries):
        return True
    tars = [e for e in entries if e.suffix == ".tar" and e.is_file()]
    return bool(tars) and not any(e.is_dir() or e.suffix.lower().lstrip(".") in TAR_IMAGE_EXTS for e in entries)


# ------------------------------------------------------------------------------------------- index


@dataclass
class ShardSplit:
    """One split: samples of shard s are ``starts[s]:starts[s+1]``, in the order they are stored."""

    name: str
    tars: list[Path]
    starts: np.ndarray  # (S+1,) int64
    rows: np.ndarray  # (N, 3) int64: byte offset, size, label (-1 when unlabelled)
    labeled: bool

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self.rows[:, 2]

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1


@dataclass
class ShardIndex:
    root: Path
    splits: dict[str, ShardSplit]
    n_px: int | None  # the side images were stored at; None for full-resolution files
    classes: list[str] | None
    val_carved: bool
    source: str

    @classmethod
    def open(cls, root: str | os.PathLike) -> ShardIndex:
        root = Path(root)
        if (root / SHARDS_FILE).is_file():
            return _open_ours(root)
        if any(root.glob("*.idx.npy")):
            raise ValueError(f"{root}: has shard index files but no {SHARDS_FILE}: 'igpt prepare --shards' "
                             "did not finish writing it; run it again")
        return _open_webdataset(root)

    def split(self, name: str) -> ShardSplit:
        if name not in self.splits:
            raise ValueError(f"--data {self.root}: has no {name!r} split; available: {', '.join(sorted(self.splits))}")
        return self.splits[name]


def _split_from_rows(name: str, tars: list[Path], rows: list[np.ndarray], labeled: bool) -> ShardSplit:
    counts = [len(r) for r in rows]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    stacked = np.concatenate(rows).astype(np.int64) if rows else np.empty((0, 3), np.int64)
    return ShardSplit(name, tars, starts, stacked, labeled)


def _read_index(tar: Path, idx: Path, n: int, size: int) -> np.ndarray:
    """One shard's index, checked against shards.json and the tar on disk (missing, truncated, corrupt)."""
    if not tar.is_file():
        raise ValueError(f"{tar}: listed in {SHARDS_FILE} but missing; run prepare again")
    if tar.stat().st_size != size:
        raise ValueError(f"{tar}: {tar.stat().st_size} bytes, {SHARDS_FILE} says {size}: truncated or "
                         "overwritten; run prepare again")
    try:
        rows = np.load(idx, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{idx}: unreadable shard index: {e}") from e
    if rows.shape != (n, 3) or rows.dtype != np.int64:
        raise ValueError(f"{idx}: {rows.dtype} {rows.shape}, expected int64 ({n}, 3); run prepare again")
    if n and ((rows[:, 0] < 0).any() or (rows[:, 0] + rows[:, 1]).max() > size):
        raise ValueError(f"{idx}: points outside {tar.name} ({size} bytes); run prepare again")
    return rows


def _open_ours(root: Path) -> ShardIndex:
    try:
        meta = json.loads((root / SHARDS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{root / SHARDS_FILE}: unreadable: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root / SHARDS_FILE}: format_version {meta.get('format_version')!r}, this igpt reads "
                         f"{FORMAT_VERSION}; run prepare again")
    splits = {}
    for name, entry in meta["splits"].items():
        tars = [root / s["tar"] for s in entry["shards"]]
        rows = [_read_index(t, root / s["index"], s["n"], s["bytes"]) for t, s in zip(tars, entry["shards"])]
        splits[name] = _split_from_rows(name, tars, rows, entry["labeled"])
        if len(splits[name]) != entry["n"]:
            raise ValueError(f"{root / SHARDS_FILE}: split {name} lists {entry['n']} images but its shards "
                             f"hold {len(splits[name])}; run prepare again")
    return ShardIndex(root, splits, meta.get("n_px"), meta.get("classes"), bool(meta.get("val_carved")),
                      str(meta.get("source", root)))


def scan_tar(path: Path) -> tuple[np.ndarray, list[str]]:
    """(rows int64 (n, 3) of (offset, size, label or -1), keys) of the image members of one uncompressed
    tar, read from its headers (tarfile seeks over the data). A sample is the members sharing a key (the
    name up to the first dot of its last component), as in WebDataset; the first image member is used."""
    samples: dict[str, list[int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                key = posixpath.join(folder, stem)
                row = samples.setdefault(key, [-1, -1, -1])
                if ext.lower() in TAR_IMAGE_EXTS and row[0] < 0:
                    row[0], row[1] = member.offset_data, member.size
                elif ext.lower() == "cls":
                    text = tar.extractfile(member).read().strip()
                    try:
                        row[2] = int(text)
                    except ValueError:
                        raise ValueError(f"{path}: {member.name} holds {text[:20]!r}, not an integer label") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable uncompressed tar: {e}") from e
    keys = [k for k, r in samples.items() if r[0] >= 0]
    if not keys:
        raise ValueError(f"{path}: no image members (extensions {', '.join(sorted(TAR_IMAGE_EXTS))})")
    return np.asarray([samples[k] for k in keys], np.int64).reshape(-1, 3), keys


def _split_name(tar: Path) -> str | None:
    found = _SPLIT_TOKEN.search(tar.stem.lower())
    return None if found is None else {"valid": "val", "validation": "val"}.get(found.group(1), found.group(1))


def _open_webdataset(root: Path) -> ShardIndex:
    tars = sorted(p for p in root.glob("*.tar") if not p.name.startswith("."))
    if not tars:
        raise ValueError(f"--data {root}: no {SHARDS_FILE} and no *.tar shards")
    names = {t: _split_name(t) for t in tars}
    if any(n is not None for n in names.values()):
        loose = [t.name for t, n in names.items() if n is None]
        if loose:
            raise ValueError(f"{root}: {loose[0]} has no train/val/test in its name but other shards do; "
                             "rename it or move it out")
    else:
        names = {t: "train" for t in tars}
    log.info("%s: indexing %d WebDataset shards by reading their tar headers", root, len(tars))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        scanned = dict(zip(tars, pool.map(lambda t: scan_tar(t)[0], tars)))
    splits = {}
    for name in sorted(set(names.values())):
        mine = [t for t in tars if names[t] == name]
        rows = [scanned[t] for t in mine]
        labeled = all((r[:, 2] >= 0).all() for r in rows)
        if not labeled and any((r[:, 2] >= 0).any() for r in rows):
            log.warning("%s: only some %s samples have a .cls label, so the split is taken as unlabelled", root, name)
        splits[name] = _split_from_rows(name, mine, rows, labeled)
    return ShardIndex(root, splits, None, None, False, str(root))


# ------------------------------------------------------------------------------------------ writer


@dataclass
class _Plan:
    """One split to write: ``load(i)`` -> (bytes, ext) or None (unreadable, skipped) for i in 0..n-1."""

    n: int
    load: Callable[[int], tuple[bytes, str] | None]
    labels: np.ndarray | None
    keys: np.ndarray  # (n,) the source position of each image, used as its tar key


def _is_image_folder(spec: str) -> bool:
    """Whether ``read_source`` would read ``spec`` as an image folder (it tries these formats first)."""
    path = Path(spec)
    if spec == "digits" or not path.is_dir() or Path(f"{spec}_trX.npy").is_file():
        return False
    markers = (("data_batch_1", "cifar-10-batches-py"), ("train", "cifar-100-python"), ("train_X.bin", "stl10_binary"))
    if any((path / m).is_file() or (path / parent / m).is_file() for m, parent in markers):
        return False
    return not any(path.glob("*_trX.npy"))


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


def _subset(plan: _Plan, idx: np.ndarray) -> _Plan:
    return _Plan(len(idx), lambda i: plan.load(int(idx[i])), None if plan.labels is None else plan.labels[idx],
                 plan.keys[idx])


def _carve(plans: dict[str, _Plan], val_fraction: float, seed: int) -> bool:
    """Carve val out of train as ``igpt prepare`` does (the same indices), when the source has no val."""
    if "train" not in plans or "val" in plans or val_fraction == 0:
        return False
    train_idx, val_idx = split_indices(plans["train"].n, val_fraction, seed)
    if len(val_idx) == 0:
        return False
    plans["train"], plans["val"] = _subset(plans["train"], train_idx), _subset(plans["train"], val_idx)
    return True


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


def _array_plans(data: str, n_px: int, resize: str, on_error: str) -> tuple[dict[str, _Plan], list[str] | None]:
    raw = read_source(data, n_px, resize=resize, on_error=on_error)
    if any(s.pixels is None for s in raw.values()):
        raise ValueError(f"--data {data} holds palette ids, not images: --shards stores images; use prepare "
                         "without --shards")
    plans = {name: _Plan(len(s.pixels), _png_loader(s.pixels), s.labels, np.arange(len(s.pixels)))
             for name, s in raw.items()}
    return plans, next((s.classes for s in raw.values() if s.classes is not None), None)


def _loaded(pool: ThreadPoolExecutor, plan: _Plan, pick: np.ndarray) -> Iterator[tuple[int, tuple[bytes, str] | None]]:
    for start in range(0, len(pick), _CHUNK):
        chunk = [int(i) for i in pick[start:start + _CHUNK]]
        yield from zip(chunk, pool.map(plan.load, chunk))


def _add_member(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(blob), 0o644, 0  # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(blob))


def _write_shard(out: Path, stem: str, items: Iterator, plan: _Plan, bar) -> dict | None:
    """Write one tar and its index through temporary names; None when every image was skipped."""
    tmp_tar, tmp_idx = out / f".tmp{os.getpid()}.{stem}.tar", out / f".tmp{os.getpid()}.{stem}.idx.npy"
    try:
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
            return None
        rows, _ = scan_tar(tmp_tar)  # the index is what a reader of the finished tar would find
        if len(rows) != n:
            raise ValueError(f"{out / stem}.tar: wrote {n} images but its headers list {len(rows)}")
        np.save(tmp_idx, rows, allow_pickle=False)
        size = tmp_tar.stat().st_size
        os.replace(tmp_tar, out / f"{stem}.tar")
        os.replace(tmp_idx, out / f"{stem}.idx.npy")
        return {"tar": f"{stem}.tar", "index": f"{stem}.idx.npy", "n": n, "bytes": size}
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)


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


def write_shards(data: str, out_dir: str | os.PathLike, *, n_px: int, per_shard: int, val_fraction: float = 0.1,
                 seed: int = 0, resize: str = "center", on_error: str = "stop", progress: bool = True) -> dict:
    """Write ``data`` as tar shards of ``per_shard`` images each (see the module docstring). Returns the
    contents of shards.json. An image folder's files are copied (``n_px`` and ``resize`` are then unused)."""
    from tqdm.auto import tqdm  # lazy: only writing shows a progress bar

    if per_shard < 1:
        raise ValueError(f"--shards must be >= 1 images per shard, got {per_shard}")
    if on_error not in ("stop", "skip"):
        raise ValueError(f"--on-error must be 'stop' or 'skip', got {on_error!r}")
    if is_shard_dir(data):
        raise ValueError(f"--data {data} is already a shards directory; train on it directly")
    folder = _is_image_folder(str(data))
    plans, classes = _folder_plans(Path(data), on_error) if folder else _array_plans(str(data), n_px, resize, on_error)
    carved = _carve(plans, val_fraction, seed)
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
    meta = {"format_version": FORMAT_VERSION, "n_px": None if folder else n_px,
            "encoding": "original files" if folder else "png", "images_per_shard": per_shard,
            "classes": classes, "source": str(data), "val_fraction": val_fraction, "seed": seed,
            "val_carved": carved, "splits": splits}
    tmp = out / f".tmp{os.getpid()}.{SHARDS_FILE}"
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / SHARDS_FILE)  # last: its presence means every shard above is complete
    finally:
        tmp.unlink(missing_ok=True)
    return meta
