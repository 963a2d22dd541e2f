"""Sharded image datasets for data larger than memory: the format and its index (the writer, ``igpt prepare
--shards N``, is ``igpt.data.shard_writer``; the training stream is ``igpt.data.shard_streams``).

A shards directory is WebDataset-compatible::

    train-000000.tar        N images as members ``{key}.{ext}``, plus ``{key}.cls`` (the label as text)
                            when labelled; key = the image's position in its source split
    train-000000.idx.npy    int64 (n, 3): (byte offset, size, label or -1) of each image member, so an
                            image is one positional read, with no scanning
    val-000000.tar, ...     the validation split (the source's own, or carved as ``igpt prepare`` does)
    shards.json             written last: splits -> shard files, counts and sizes, n_px, classes, source

``ShardIndex.open(dir)`` also reads plain WebDataset tar shards (a directory of ``*.tar``, no index): the
member index is built by reading the tar headers at open time; a split is named by a ``train``/``val``/
``test`` token in the file name (all files are "train" when none has one); labels come from ``.cls``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.arrays import load_npy
from igpt.atomic import read_json

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"
FORMAT_VERSION = 1
TAR_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})
_SPLIT_TOKEN = re.compile(r"(?:^|[-_.])(train|val|valid|validation|test)(?=[-_.\d]|$)")


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
    rows = load_npy(idx)
    if rows.shape != (n, 3) or rows.dtype != np.int64:
        raise ValueError(f"{idx}: {rows.dtype} {rows.shape}, expected int64 ({n}, 3); run prepare again")
    if n and ((rows[:, 0] < 0).any() or (rows[:, 0] + rows[:, 1]).max() > size):
        raise ValueError(f"{idx}: points outside {tar.name} ({size} bytes); run prepare again")
    return rows


def _open_ours(root: Path) -> ShardIndex:
    meta = read_json(root / SHARDS_FILE)
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
