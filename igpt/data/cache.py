"""Datasets as arrays: the one entry point ``open_split`` and the prepared cache written by ``prepare``.

``open_split(data, split, n_px=...)`` accepts every ``--data`` spec of ``igpt.data.sources`` plus a directory
written by ``prepare`` (recognised by its ``meta.json``). Splits: "train", "val", "test", "unlabeled" and
"train_all" (the source's whole train split, including whatever was carved out of it for "val").

When a source has no val split, val is ``round(val_fraction * N)`` train images (at least 1 when
val_fraction > 0 and N >= 2) picked by ``np.random.default_rng(seed).permutation(N)``; "train" is the rest.
Both keep the source order. A source's own val split (OpenAI's vaX, an image folder's val/) is used as is.

Cache layout (``prepare``): ``{split}_pixels.npy`` uint8 (N, n_px, n_px, 3) or ``{split}_ids.npy`` uint16
(N, T), ``{split}_labels.npy`` int64 (N,) when labelled, and ``meta.json`` written last, so a directory
without it is never taken for a complete cache. On a cache, val_fraction, seed and resize come from
meta.json and the arguments of ``open_split`` are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.data.sources import RawSplit, read_source

SPLITS = ("train", "val", "test", "unlabeled", "train_all")
FORMAT_VERSION = 1
_CHUNK = 4096  # images encoded or written per step


@dataclass
class ImageSet:
    n_px: int
    pixels: np.ndarray | None  # (N, n_px, n_px, 3) uint8, possibly np.memmap
    ids: np.ndarray | None  # (N, T) uint16, possibly np.memmap
    labels: np.ndarray | None  # (N,) int64
    classes: list[str] | None
    palette_fingerprint: str | None  # set when the ids were made by one of our palettes
    source: str  # the --data spec, for messages

    def __len__(self) -> int:
        return len(self.pixels if self.pixels is not None else self.ids)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), each sorted, disjoint, together 0..n-1."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)  # never an empty val, never an empty train
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _take(split: RawSplit, idx: np.ndarray) -> RawSplit:
    pick = (lambda a: None if a is None else a[idx])
    return RawSplit(pick(split.pixels), pick(split.ids), pick(split.labels), split.classes)


def _with_val(raw: dict[str, RawSplit], val_fraction: float, seed: int) -> tuple[dict[str, RawSplit], bool]:
    """Add "train_all" and, when the source has none, a carved "val". Returns (splits, val_was_carved)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = dict(raw)
    if "train" not in raw:
        return out, False
    out["train_all"] = raw["train"]
    if "val" in raw or val_fraction == 0:
        return out, False
    train = raw["train"]
    train_idx, val_idx = split_indices(len(train.pixels if train.pixels is not None else train.ids),
                                       val_fraction, seed)
    if len(val_idx) == 0:
        return out, False
    out["train"], out["val"] = _take(train, train_idx), _take(train, val_idx)
    return out, True


def _missing_split(split: str, source: str, available: list[str], val_fraction: float | None) -> ValueError:
    hint = ""
    if split == "val" and val_fraction == 0:
        hint = " (val_fraction is 0, so no val split is carved from train)"
    return ValueError(f"--data {source}: has no {split!r} split{hint}; available: {', '.join(available)}")


def open_split(data: str, split: str, *, n_px: int, val_fraction: float = 0.1, seed: int = 0,
               resize: str = "center", on_error: str = "stop") -> ImageSet:
    """One split of a ``--data`` spec or a prepared cache directory, as an ImageSet."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if (Path(data) / "meta.json").is_file():
        return _open_cache(Path(data), split, n_px)
    from igpt.data.shards import is_shard_dir  # lazy: igpt.data.shards imports this module

    if is_shard_dir(data):  # decoded into memory; training streams it instead (igpt.data.shard_streams)
        from igpt.data.shard_streams import open_shard_split

        return open_shard_split(str(data), split, n_px)
    splits, _ = _with_val(read_source(data, n_px, resize=resize, on_error=on_error), val_fraction, seed)
    if split not in splits:
        raise _missing_split(split, str(data), sorted(splits), val_fraction)
    s = splits[split]
    return ImageSet(n_px, s.pixels, s.ids, s.labels, s.classes, None, str(data))


# ---------------------------------------------------------------------------------------------- cache


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing from the prepared cache; run prepare again")
    return np.load(path, mmap_mode="r")


def _read_meta(root: Path) -> dict:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{root / 'meta.json'}: unreadable cache metadata: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root / 'meta.json'}: format_version {meta.get('format_version')!r}, this igpt "
                         f"reads {FORMAT_VERSION}; run prepare again")
    return meta


def _cache_split(root: Path, meta: dict, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels or ids, labels) of one stored split, memory-mapped, checked against meta.json."""
    kind, n, n_px = meta["kind"], meta["splits"][split]["n"], meta["n_px"]
    x = _load(root / f"{split}_{kind}.npy")
    want = (n, n_px, n_px, 3) if kind == "pixels" else (n, n_px * n_px)
    if x.shape != want:
        raise ValueError(f"{root / f'{split}_{kind}.npy'}: shape {x.shape}, meta.json says {want}; run prepare again")
    labels = _load(root / f"{split}_labels.npy") if meta["splits"][split]["labeled"] else None
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{root / f'{split}_labels.npy'}: shape {labels.shape}, expected ({n},)")
    return x, labels


def _cache_train_all(root: Path, meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """train + carved val, back in the source's order (the same indices the carving used)."""
    (x_tr, y_tr), (x_va, y_va) = _cache_split(root, meta, "train"), _cache_split(root, meta, "val")
    train_idx, val_idx = split_indices(len(x_tr) + len(x_va), meta["val_fraction"], meta["seed"])
    if len(val_idx) != len(x_va):
        raise ValueError(f"{root / 'meta.json'}: val has {len(x_va)} items but the recorded carving gives "
                         f"{len(val_idx)}; run prepare again")
    x = np.empty((len(x_tr) + len(x_va),) + x_tr.shape[1:], x_tr.dtype)
    x[train_idx], x[val_idx] = x_tr, x_va
    y = None
    if y_tr is not None and y_va is not None:
        y = np.empty(len(x), np.int64)
        y[train_idx], y[val_idx] = y_tr, y_va
    return x, y


def _open_cache(root: Path, split: str, n_px: int) -> ImageSet:
    meta = _read_meta(root)
    if meta["n_px"] != n_px:
        raise ValueError(f"{root}: prepared at n_px={meta['n_px']} but n_px={n_px} was asked for; "
                         "use the matching --n-px or prepare again")
    stored = list(meta["splits"])
    available = stored + (["train_all"] if "train" in stored else [])
    if split not in available:
        raise _missing_split(split, str(root), available, None)
    if split == "train_all" and meta.get("val_carved"):
        x, labels = _cache_train_all(root, meta)
    else:
        x, labels = _cache_split(root, meta, "train" if split == "train_all" else split)
    pixels, ids = (x, None) if meta["kind"] == "pixels" else (None, x)
    classes = meta.get("classes") if labels is not None else None  # as the direct path: unlabelled, no classes
    return ImageSet(n_px, pixels, ids, labels, classes, meta.get("palette_fingerprint"), str(root))


def _write_atomic(out_dir: Path, name: str, arr: np.ndarray, bar, encode=None) -> None:
    """Write arr, or encode(chunk) for each chunk of it, to out_dir/name through a temporary file and
    os.replace, so a crash never leaves a half-written file under the final name."""
    n = len(arr)
    shape = arr.shape if encode is None else (n, arr.shape[1] * arr.shape[2])
    dtype = arr.dtype if encode is None else np.dtype(np.uint16)
    tmp = out_dir / f".tmp{os.getpid()}.{name}"  # ends in .npy, so np.save does not append a suffix
    try:
        if n == 0:  # a zero-length array cannot be memory-mapped
            np.save(tmp, np.empty(shape, dtype), allow_pickle=False)
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for start in range(0, n, _CHUNK):
                chunk = np.asarray(arr[start:start + _CHUNK])
                out[start:start + len(chunk)] = chunk if encode is None else encode(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            out.flush()
            del out  # close the map before the rename
        os.replace(tmp, out_dir / name)
    finally:
        tmp.unlink(missing_ok=True)


def _encoder(palette):
    def encode(chunk: np.ndarray) -> np.ndarray:  # (n, n_px, n_px, 3) uint8 -> (n, T) uint16
        ids = palette.encode(chunk)
        ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"palette produced ids {ids.min()}..{ids.max()}, which do not fit uint16")
        return ids.reshape(len(chunk), -1).astype(np.uint16)

    return encode


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(data: str, out_dir: str, *, n_px: int, palette=None, val_fraction: float = 0.1, seed: int = 0,
            resize: str = "center", on_error: str = "stop", progress: bool = True) -> dict:
    """Read ``data``, carve val, and write the cache described in the module docstring. Returns meta.

    With ``palette``, pixels are stored as its ids and its fingerprint is recorded; OpenAI's pre-quantized
    files are stored as ids either way (fingerprint recorded only when a palette is given).
    """
    from tqdm.auto import tqdm  # lazy: only prepare shows a progress bar

    if (Path(data) / "meta.json").is_file():
        raise ValueError(f"--data {data} is already a prepared cache; open it with open_split directly")
    raw = read_source(data, n_px, resize=resize, on_error=on_error)
    splits, carved = _with_val(raw, val_fraction, seed)
    splits.pop("train_all", None)  # rebuilt from train + val on open
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here until the end, out_dir is not a complete cache
    kind = "ids" if palette is not None or any(s.ids is not None for s in splits.values()) else "pixels"
    encode = _encoder(palette) if palette is not None else None
    total = sum(len(s.pixels if s.pixels is not None else s.ids) for s in splits.values())
    entries = {}
    with tqdm(total=total, desc=f"prepare {out}", unit="img", disable=not progress) as bar:
        for name, s in splits.items():
            if s.pixels is not None:
                _write_atomic(out, f"{name}_{kind}.npy", s.pixels, bar, encode)
            else:
                _write_atomic(out, f"{name}_ids.npy", s.ids, bar)
            if s.labels is not None:
                _write_atomic(out, f"{name}_labels.npy", np.asarray(s.labels, np.int64), None)
            entries[name] = {"n": len(s.pixels if s.pixels is not None else s.ids), "labeled": s.labels is not None}
    classes = next((s.classes for s in splits.values() if s.classes is not None), None)
    meta = {"format_version": FORMAT_VERSION, "n_px": n_px, "kind": kind, "splits": entries, "classes": classes,
            "palette_fingerprint": palette.fingerprint() if palette is not None else None, "source": str(data),
            "val_fraction": val_fraction, "seed": seed, "resize": resize, "val_carved": carved}
    _write_json_atomic(out / "meta.json", meta)  # last: its presence means every file above is complete
    return meta


def check_palette(imageset: ImageSet, palette) -> None:
    """Raise if imageset's ids were made by a different palette than ``palette``.

    Ids without a fingerprint (OpenAI's pre-quantized files) are not checked: they need OpenAI's
    kmeans_centers.npy, which the caller must supply. Pixels need no check.
    """
    if imageset.ids is None or imageset.palette_fingerprint is None:
        return
    have = palette.fingerprint()
    if have != imageset.palette_fingerprint:
        raise ValueError(f"--data {imageset.source}: ids were made with palette {imageset.palette_fingerprint} "
                         f"but the palette given is {have}; use the palette that prepared the data or prepare again")
