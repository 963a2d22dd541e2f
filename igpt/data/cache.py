"""The prepared cache (``igpt prepare``): every split of a dataset as memory-mapped arrays.

Layout: ``{split}_pixels.npy`` uint8 (N, n_px, n_px, 3) or ``{split}_ids.npy`` uint16 (N, T) with T = grid**2
(a palette's grid is n_px; a VQ-VAE's is n_px / its factor; meta.json records it, and a cache without it has
grid = n_px),
``{split}_labels.npy`` int64 (N,) when labelled, and ``meta.json`` written last, so a directory without it
is never taken for a complete cache. "train_all" is rebuilt on open from train and the carved val, in the
source's order. On a cache, the val carve, its seed and the resize come from meta.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from igpt.atomic import read_json, replacing, write_json
from igpt.arrays import load_npy
from igpt.data.imageset import ImageSet, check_labels
from igpt.data.splits import RawSplit, carve_val, first_available, split_indices
from igpt.tokenizers import AnyTokenizer, recorded_fingerprint

META = "meta.json"
FORMAT_VERSION = 1
_CHUNK = 4096  # images encoded or written per step


def is_cache(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing from the prepared cache; run prepare again")
    return load_npy(path, mmap=True)


def read_meta(root: Path) -> dict[str, Any]:
    meta = read_json(root / META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root / META}: format_version {meta.get('format_version')!r}, this igpt "
                         f"reads {FORMAT_VERSION}; run prepare again")
    return meta


def _cache_split(root: Path, meta: dict, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels or ids, labels) of one stored split, memory-mapped, checked against meta.json."""
    kind, n, n_px = meta["kind"], meta["splits"][split]["n"], meta["n_px"]
    grid = meta.get("grid", n_px)
    x = _load(root / f"{split}_{kind}.npy")
    want = (n, n_px, n_px, 3) if kind == "pixels" else (n, grid * grid)
    if x.shape != want:
        raise ValueError(f"{root / f'{split}_{kind}.npy'}: shape {x.shape}, {META} says {want}; run prepare again")
    labels = _load(root / f"{split}_labels.npy") if meta["splits"][split]["labeled"] else None
    if labels is not None:
        if labels.shape != (n,):
            raise ValueError(f"{root / f'{split}_labels.npy'}: shape {labels.shape}, expected ({n},)")
        labels = check_labels(labels, meta.get("classes"), str(root / f"{split}_labels.npy"))
    return x, labels


def _cache_train_all(root: Path, meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """train + carved val, back in the source's order (the same indices the carving used)."""
    (x_tr, y_tr), (x_va, y_va) = _cache_split(root, meta, "train"), _cache_split(root, meta, "val")
    train_idx, val_idx = split_indices(len(x_tr) + len(x_va), meta["val_fraction"], meta["seed"])
    if len(val_idx) != len(x_va):
        raise ValueError(f"{root / META}: val has {len(x_va)} items but the recorded carving gives "
                         f"{len(val_idx)}; run prepare again")
    x = np.empty((len(x_tr) + len(x_va),) + x_tr.shape[1:], x_tr.dtype)
    x[train_idx], x[val_idx] = x_tr, x_va
    y = None
    if y_tr is not None and y_va is not None:
        y = np.empty(len(x), np.int64)
        y[train_idx], y[val_idx] = y_tr, y_va
    return x, y


def open_cache(root: Path, names: tuple[str, ...], n_px: int) -> tuple[ImageSet, str]:
    """(the first split of ``names`` the cache has, its name); an n_px other than the cache's is an error."""
    meta = read_meta(root)
    if meta["n_px"] != n_px:
        raise ValueError(f"--data {root}: prepared at {meta['n_px']}x{meta['n_px']}, but {n_px}x{n_px} images are "
                         f"needed here; run 'igpt prepare --n-px {n_px}' on the source again")
    stored = list(meta["splits"])
    split = first_available(names, stored + (["train_all"] if "train" in stored else []), str(root), None)
    if split == "train_all" and meta.get("val_carved"):
        x, labels = _cache_train_all(root, meta)
    else:
        x, labels = _cache_split(root, meta, "train" if split == "train_all" else split)
    pixels, ids = (x, None) if meta["kind"] == "pixels" else (None, x)
    classes = meta.get("classes") if labels is not None else None  # as the direct path: unlabelled, no classes
    return ImageSet(n_px, pixels, ids, labels, classes, recorded_fingerprint(meta), str(root)), split


def _write_array(out_dir: Path, name: str, arr: np.ndarray, bar, encode=None, tokens: int = 0) -> None:
    """Write arr, or encode(chunk) (``tokens`` ids per image) for each chunk of it, to out_dir/name atomically."""
    n = len(arr)
    shape = arr.shape if encode is None else (n, tokens)
    dtype = arr.dtype if encode is None else np.dtype(np.uint16)
    with replacing(out_dir / name) as tmp:
        if n == 0:  # a zero-length array cannot be memory-mapped
            with open(tmp, "wb") as f:
                np.save(f, np.empty(shape, dtype), allow_pickle=False)
            return
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        for start in range(0, n, _CHUNK):
            chunk = np.asarray(arr[start:start + _CHUNK])
            out[start:start + len(chunk)] = chunk if encode is None else encode(chunk)
            if bar is not None:
                bar.update(len(chunk))
        out.flush()
        del out  # close the map before the rename


def _encoder(tokenizer: AnyTokenizer):
    def encode(chunk: np.ndarray) -> np.ndarray:  # (n, n_px, n_px, 3) uint8 -> (n, T) uint16
        ids = tokenizer.encode(chunk).cpu().numpy()
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"tokenizer produced ids {ids.min()}..{ids.max()}, which do not fit uint16")
        return ids.reshape(len(chunk), -1).astype(np.uint16)

    return encode


def write_cache(raw: dict[str, RawSplit], out_dir: str | Path, *, source: str, n_px: int,
                tokenizer: AnyTokenizer | None = None, val_fraction: float = 0.1, seed: int = 0, resize: str = "center",
                progress: bool = True) -> dict[str, Any]:
    """Carve val out of the read splits ``raw`` and write the cache described in the module docstring.
    Returns meta. With ``tokenizer``, pixels are stored as its ids and its fingerprint is recorded; OpenAI's
    pre-quantized files are stored as ids either way (fingerprint recorded only when a tokenizer is given)."""
    from tqdm.auto import tqdm

    splits, carved = carve_val(raw, val_fraction, seed)
    splits.pop("train_all", None)  # rebuilt from train + val on open
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # from here until the end, out_dir is not a complete cache
    kind = "ids" if tokenizer is not None or any(s.ids is not None for s in splits.values()) else "pixels"
    encode = _encoder(tokenizer) if tokenizer is not None else None
    grid = getattr(tokenizer, "grid", None) or n_px  # a VQ-VAE's grid is its own; a palette's is n_px
    entries = {}
    with tqdm(total=sum(map(len, splits.values())), desc=f"prepare {out}", unit="img", disable=not progress) as bar:
        for name, s in splits.items():
            if s.pixels is not None:
                _write_array(out, f"{name}_{kind}.npy", s.pixels, bar, encode, grid * grid)
            else:
                _write_array(out, f"{name}_ids.npy", s.ids, bar)
            if s.labels is not None:
                _write_array(out, f"{name}_labels.npy", np.asarray(s.labels, np.int64), None)
            entries[name] = {"n": len(s), "labeled": s.labels is not None}
    classes = next((s.classes for s in splits.values() if s.classes is not None), None)
    meta = {"format_version": FORMAT_VERSION, "n_px": n_px, "grid": grid, "kind": kind, "splits": entries,
            "classes": classes,
            "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None, "source": source,
            "val_fraction": val_fraction, "seed": seed, "resize": resize, "val_carved": carved}
    write_json(out / META, meta)  # last: its presence means every file above is complete
    return meta
