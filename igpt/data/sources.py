"""Readers that turn one kind of ``--data`` into splits of pixels (or, for OpenAI's files, palette ids).

``igpt.data.open.resolve`` decides what kind a spec is; ``read(kind, path, n_px)`` then reads it:

- ``digits``: scikit-learn's bundled 8x8 digits, values 0..16 scaled to 0..255 and replicated to RGB; a
  fixed 20% test split (``default_rng(0)``).
- ``openai``: OpenAI's pre-quantized files, a prefix ``P`` with ``P_trX.npy`` (``P_vaX``/``P_teX`` and
  one-hot ``P_trY``/... optional). These are ids, not pixels.
- ``npz``: ``x_train`` (uint8 NHWC or NHW) and optionally ``y_train``, ``x_val``, ``y_val``, ``x_test``,
  ``y_test``, ``label_names`` (the layout of shared/data/cifar10.npz).
- ``cifar10`` / ``cifar100``: the python pickle folders (``data_batch_1``..``5``, ``test_batch``; or
  ``train``, ``test`` with fine labels).
- ``stl10``: the binary folder (``train_X.bin``...); ``unlabeled_X.bin`` is memory-mapped.
- ``folder``: sub-folders named only ``train``/``val``/``test`` map to those splits; other sub-folders are
  classes (sorted names, images found recursively); images directly inside are one unlabelled "train".

Every image reaches ``n_px`` through ``to_n_px``. The CIFAR pickles are read with an unpickler that only
rebuilds numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from igpt.config import N_VOCAB  # OpenAI's files hold ids of their 512-colour palette
from igpt.config import RESIZE_MODES
from igpt.arrays import load_npy, npz_array, open_npz
from igpt.data.images import open_image, to_n_px
from igpt.data.imageset import check_labels
from igpt.data.splits import RawSplit

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_SPLIT_DIRS = ("train", "val", "test")
_CHUNK = 1024  # images resized per step, so a memory-mapped source is never copied whole
# PIL reports broken files through any of these, depending on the plugin and where decoding stops.


def _resize_array(x: np.ndarray, n_px: int, mode: str) -> np.ndarray:
    """(N, H, W, 3) uint8 (possibly a memmap view) -> (N, n_px, n_px, 3) in memory, a chunk at a time."""
    out = np.empty((len(x), n_px, n_px, 3), np.uint8)
    for start in range(0, len(x), _CHUNK):
        chunk = np.ascontiguousarray(x[start:start + _CHUNK])  # (<=_CHUNK, H, W, 3)
        if chunk.shape[1:3] == (n_px, n_px):
            out[start:start + len(chunk)] = chunk
        else:
            for i, im in enumerate(chunk):
                out[start + i] = to_n_px(im, n_px, mode)
    return out


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _image_file(entry: os.DirEntry) -> Path:
    """A directory entry named like an image, as a path; a ValueError naming it when it is a pipe, socket or
    device. A reader would block on a pipe forever (or read a device without end), and a file named like an
    image was meant to be read, so it is refused rather than skipped. A broken link passes: the decoder
    reports it as unreadable like any damaged image."""
    if entry.is_file():  # the common case costs no stat: the directory listing gives the type
        return Path(entry.path)
    try:
        mode = os.stat(entry.path).st_mode
    except OSError:
        return Path(entry.path)
    what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    raise ValueError(f"{entry.path} is {what}, not an image file; image folders must hold regular files only: "
                     "remove it or put the image it stands for in its place")


def _listing(root: Path) -> list[os.DirEntry]:
    """The entries of ``root`` by name, hidden ones left out; one line when it cannot be listed."""
    try:
        with os.scandir(root) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise ValueError(f"{root}: cannot list this folder: {e.strerror or e}") from None


def walk_images(root: Path) -> list[Path]:
    """The images under ``root`` in a stable order: each folder's files by name, then its sub-folders by name
    (hidden names skipped, linked folders not entered)."""
    entries = _listing(root)
    found = [_image_file(e) for e in entries if not e.is_dir() and _is_image(Path(e.name))]
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            found += walk_images(Path(e.path))
    return found


def folder_entries(root: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, image files) directly inside ``root``, by name."""
    entries = _listing(root)
    return ([Path(e.path) for e in entries if e.is_dir()],
            [_image_file(e) for e in entries if not e.is_dir() and _is_image(Path(e.name))])


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """One image folder -> (paths, labels (N,) int64, classes), or (paths, None, None) when flat."""
    root = Path(root)
    subdirs, files = folder_entries(root)
    if subdirs and files:
        raise ValueError(f"{root}: holds both images and sub-folders ({subdirs[0].name}/...); expected one "
                         "sub-folder per class or images only")
    if files:
        return files, None, None
    if not subdirs:
        raise ValueError(f"{root}: no images found (extensions {', '.join(sorted(IMAGE_EXTS))})")
    paths, labels = [], []
    for k, d in enumerate(subdirs):
        found = walk_images(d)
        if not found:  # a class without examples is almost always a copying mistake
            raise ValueError(f"{d}: class folder holds no images; remove it or fill it")
        paths += found
        labels += [k] * len(found)
    return paths, np.asarray(labels, np.int64), [d.name for d in subdirs]


def _decode_all(paths: list[Path], n_px: int, resize: str, on_error: str, where: Path
                ) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize on a thread pool (PIL releases the GIL while decoding). Returns pixels
    (M, n_px, n_px, 3) and the (N,) bool mask of the paths kept (all but the unreadable, for on_error="skip")."""
    out = np.empty((len(paths), n_px, n_px, 3), np.uint8)
    ok = np.ones(len(paths), bool)

    def work(i: int) -> None:
        try:
            out[i] = to_n_px(open_image(paths[i]), n_px, resize)
        except ValueError:
            if on_error == "stop":
                raise
            ok[i] = False

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        try:
            for start in range(0, len(paths), 4 * _CHUNK):  # chunked, so "stop" does not wait for the whole folder
                list(pool.map(work, range(start, min(start + 4 * _CHUNK, len(paths)))))
        except BaseException:  # an error or a stop (igpt.stop): the images still queued are not decoded
            pool.shutdown(cancel_futures=True)
            raise
    if not ok.all():
        bad = [str(paths[i]) for i in np.flatnonzero(~ok)[:5]]
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", where, int((~ok).sum()), ", ".join(bad))
    if not ok.any():
        raise ValueError(f"{where}: none of its {len(paths)} image(s) could be read, e.g. {paths[0]}")
    return (out if ok.all() else out[ok]), ok


def _read_folder(root: Path, n_px: int, resize: str, on_error: str, classes: list[str] | None = None
                 ) -> RawSplit:
    paths, labels, own = list_image_folder(root)
    if labels is not None and classes is not None:  # map this folder's classes onto the shared list
        labels = np.asarray([classes.index(c) for c in own], np.int64)[labels]
    pixels, ok = _decode_all(paths, n_px, resize, on_error, root)
    if labels is not None:
        labels = labels[ok]
    return RawSplit(pixels, None, labels, (classes or own) if labels is not None else None)


def split_folders(root: str | os.PathLike) -> list[Path]:
    """The train/val/test sub-folders when those are all root holds (a split layout), else []."""
    subdirs, files = folder_entries(Path(root))
    return subdirs if subdirs and not files and all(d.name in _SPLIT_DIRS for d in subdirs) else []


def _read_image_tree(root: Path, n_px: int, resize: str, on_error: str) -> dict[str, RawSplit]:
    split_dirs = split_folders(root)
    if not split_dirs:
        return {"train": _read_folder(root, n_px, resize, on_error)}
    # train/val/test layout: one class list for all splits (the sorted union), so label k means the same
    # class in every split.
    names = sorted({c.name for d in split_dirs for c in folder_entries(d)[0]})
    return {d.name: _read_folder(d, n_px, resize, on_error, names or None) for d in split_dirs}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays only, so a tampered pickle cannot call anything else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        old = module.replace("numpy._core", "numpy.core")  # numpy 2 writes numpy._core, numpy 1 numpy.core
        if (old, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain CIFAR pickle")
        try:  # numpy 2 first: its numpy.core is a shim that warns on every use
            return super().find_class(old.replace("numpy.core", "numpy._core"), name)
        except ImportError:
            return super().find_class(old, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR python pickle: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return d


def _cifar_batch(path: Path, label_key: bytes, classes: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if b"data" not in d or label_key not in d:
        raise ValueError(f"{path}: expected keys b'data' and {label_key!r}, found {sorted(d, key=str)}")
    data = d[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got {getattr(data, 'dtype', type(data))} "
                         f"{getattr(data, 'shape', '')}")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3): a row is R plane | G plane | B plane
    y = np.asarray(d[label_key])  # (N,)
    if y.shape != (len(x),):
        raise ValueError(f"{path}: {len(x)} images but labels of shape {y.shape}")
    return x, check_labels(y, classes, f"{path}: {label_key!r}")


def _cifar_names(path: Path, key: bytes) -> list[str] | None:
    names = _load_pickle(path).get(key) if path.is_file() else None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names is not None else None


# Python-pickle CIFAR layouts: (train files, test file, label key, names file, names key).
_CIFAR10 = (tuple(f"data_batch_{k}" for k in range(1, 6)), "test_batch", b"labels", "batches.meta", b"label_names")
_CIFAR100 = (("train",), "test", b"fine_labels", "meta", b"fine_label_names")


def _read_cifar(root: Path, layout: tuple, n_px: int, resize: str) -> dict[str, RawSplit]:
    train_files, test_file, key, names_file, names_key = layout
    missing = [f for f in (*train_files, test_file) if not (root / f).is_file()]
    if missing:
        raise ValueError(f"{root}: incomplete CIFAR python folder, missing {', '.join(missing)}")
    classes = _cifar_names(root / names_file, names_key)
    parts = [_cifar_batch(root / f, key, classes) for f in train_files]
    x_te, y_te = _cifar_batch(root / test_file, key, classes)
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return {"train": RawSplit(_resize_array(x_tr, n_px, resize), None, y_tr, classes),
            "test": RawSplit(_resize_array(x_te, n_px, resize), None, y_te, classes)}


def _stl_images(path: Path) -> np.ndarray:
    per_image = 3 * 96 * 96
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise ValueError(f"{path}: {size} bytes is not a whole number of 3x96x96 STL-10 images")
    x = np.memmap(path, np.uint8, mode="r", shape=(size // per_image, 3, 96, 96))
    # Each image is stored column-major per channel: axis 2 is the column, axis 3 the row.
    return x.transpose(0, 3, 2, 1)  # (N, 96, 96, 3), still a memmap view


def _stl_labels(path: Path, n: int, classes: list[str] | None) -> np.ndarray:
    y = np.fromfile(path, np.uint8).astype(np.int64)  # 1..10
    if y.shape != (n,) or (n and y.min() < 1):
        raise ValueError(f"{path}: expected {n} labels in 1..10, got {len(y)} (min {y.min() if len(y) else '-'})")
    return check_labels(y - 1, classes, str(path))


def _read_stl10(root: Path, n_px: int, resize: str) -> dict[str, RawSplit]:
    names_file = root / "class_names.txt"
    classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()] \
        if names_file.is_file() else None
    out = {}
    for split in ("train", "test", "unlabeled"):
        if not (root / f"{split}_X.bin").is_file():
            continue
        x = _stl_images(root / f"{split}_X.bin")
        y_file = root / f"{split}_y.bin"
        labels = _stl_labels(y_file, len(x), classes) if y_file.is_file() else None
        out[split] = RawSplit(_resize_array(x, n_px, resize), None, labels, classes if labels is not None else None)
    return out


def _npz_images(x: np.ndarray, path: Path, key: str, n_px: int, resize: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {key} must be uint8 pixels, got {x.dtype}")
    if x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 1):  # greyscale (N, H, W[, 1]) -> RGB
        x = np.repeat(x.reshape(x.shape[:3])[..., None], 3, axis=3)
    if x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"{path}: {key} must be (N, H, W, 3) NHWC, got shape {x.shape}")
    return _resize_array(x, n_px, resize)


def _read_npz(path: Path, n_px: int, resize: str) -> dict[str, RawSplit]:
    with open_npz(path) as z:
        if "x_train" not in z.files:
            raise ValueError(f"{path}: no 'x_train' array (found {', '.join(z.files) or 'none'}); expected "
                             "x_train [y_train, x_val, y_val, x_test, y_test, label_names]")
        names = npz_array(z, "label_names", path) if "label_names" in z.files else None
        classes = [str(n) for n in names] if names is not None else None
        out = {}
        for split in ("train", "val", "test"):
            if f"x_{split}" not in z.files:
                continue
            x = _npz_images(npz_array(z, f"x_{split}", path), path, f"x_{split}", n_px, resize)
            labels = None
            if f"y_{split}" in z.files:
                labels = npz_array(z, f"y_{split}", path)
                labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
                if labels.shape != (len(x),):
                    raise ValueError(f"{path}: y_{split} has shape {labels.shape}, expected ({len(x)},)")
                labels = check_labels(labels, classes, f"{path}: y_{split}")
            out[split] = RawSplit(x, None, labels, classes if labels is not None else None)
    return out


def _openai_ids(path: Path, n_px: int) -> np.ndarray:
    x = load_npy(path, mmap=True)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{path}: expected integer ids (N, T), got {x.dtype} {x.shape}")
    if x.shape[1] != n_px * n_px:
        raise ValueError(f"{path}: sequences have T={x.shape[1]} but n_px={n_px} needs T={n_px * n_px}")
    out = np.empty(x.shape, np.uint16)  # (N, T)
    for start in range(0, len(x), 16 * _CHUNK):
        chunk = np.asarray(x[start:start + 16 * _CHUNK])
        if chunk.size and (chunk.min() < 0 or chunk.max() >= N_VOCAB):
            raise ValueError(f"{path}: ids must be in 0..{N_VOCAB - 1}, found {chunk.min()}..{chunk.max()}")
        out[start:start + len(chunk)] = chunk
    return out


def _openai_labels(path: Path, n: int) -> np.ndarray:
    y = load_npy(path, mmap=True)  # (N, C) one-hot; ImageNet's is ~5 GB as float32, so read it in chunks
    if y.ndim != 2 or len(y) != n:
        raise ValueError(f"{path}: expected one-hot labels ({n}, C), got shape {y.shape}")
    labels = np.empty(n, np.int64)
    for start in range(0, n, 16 * _CHUNK):
        chunk = np.asarray(y[start:start + 16 * _CHUNK])
        if ((chunk != 0).sum(1) != 1).any():
            raise ValueError(f"{path}: rows must be one-hot (exactly one non-zero entry)")
        labels[start:start + len(chunk)] = chunk.argmax(1)
    return labels


def _read_openai(prefix: str, n_px: int) -> dict[str, RawSplit]:
    out = {}
    for split, tag in (("train", "tr"), ("val", "va"), ("test", "te")):
        x_file, y_file = Path(f"{prefix}_{tag}X.npy"), Path(f"{prefix}_{tag}Y.npy")
        if x_file.is_file():
            ids = _openai_ids(x_file, n_px)
            out[split] = RawSplit(None, ids, _openai_labels(y_file, len(ids)) if y_file.is_file() else None, None)
    return out


def _read_digits(n_px: int, resize: str) -> dict[str, RawSplit]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed for this toy source

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    x = _resize_array(np.repeat(grey[..., None], 3, axis=3), n_px, resize)  # (1797, n_px, n_px, 3)
    y = d.target.astype(np.int64)
    # A fixed test split, independent of user seeds, so every run evaluates on the same images.
    perm = np.random.default_rng(0).permutation(len(x))
    n_test = round(0.2 * len(x))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    classes = [str(k) for k in range(10)]
    return {"train": RawSplit(x[train], None, y[train], classes), "test": RawSplit(x[test], None, y[test], classes)}


def read(kind: str, path: str, n_px: int, *, resize: str = "center", on_error: str = "stop") -> dict[str, RawSplit]:
    """Read a resolved ``--data`` into {"train"|"val"|"test"|"unlabeled": RawSplit} (see the module
    docstring). ``on_error`` ("stop" or "skip") decides what an unreadable image in a folder does: raise
    naming it, or be left out with one warning that counts them."""
    if n_px < 1:
        raise ValueError(f"--n-px must be >= 1, got {n_px}")
    if on_error not in ("stop", "skip"):
        raise ValueError(f"--on-error must be 'stop' or 'skip', got {on_error!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {RESIZE_MODES}, got {resize!r}")
    root = Path(path)
    readers = {"digits": lambda: _read_digits(n_px, resize),
               "openai": lambda: _read_openai(path, n_px),
               "npz": lambda: _read_npz(root, n_px, resize),
               "cifar10": lambda: _read_cifar(root, _CIFAR10, n_px, resize),
               "cifar100": lambda: _read_cifar(root, _CIFAR100, n_px, resize),
               "stl10": lambda: _read_stl10(root, n_px, resize),
               "folder": lambda: _read_image_tree(root, n_px, resize, on_error)}
    if kind not in readers:
        raise ValueError(f"--data {path}: no reader for data of kind {kind!r}")
    return readers[kind]()
