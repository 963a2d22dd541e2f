""".npy and .npz files read with ``allow_pickle=False`` (a data file must not be able to run code), so that
each way such a file can be unreadable (an object array, which numpy refuses to unpickle; a truncated copy;
something that is not numpy's format at all) is a one-line error naming the file."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# What numpy raises on a file it cannot read: ValueError (object arrays, bad headers, short memory maps),
# OSError and EOFError (truncated files), and from the zip layer of an .npz BadZipFile and zlib.error.
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def array_error(e: BaseException) -> str:
    """numpy's reason in one line; its refusals to unpickle (which go on to suggest unpickling) in our words."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Object arrays cannot be loaded" in text or "Python objects in dtype" in text:
        return ("it holds Python objects (a pickled object array), which igpt does not unpickle; store numbers, "
                "or strings as a fixed-width unicode array")
    if "pickled" in text:  # numpy found neither its .npy header nor a zip archive, and will not unpickle
        return "it is not in numpy's format (a Python pickle, which igpt does not unpickle, or another kind of file)"
    return text


def load_npy(path: str | Path, *, mmap: bool = False) -> np.ndarray:
    """The array of the .npy file ``path`` (memory-mapped read-only with ``mmap``)."""
    try:
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except UNREADABLE as e:
        raise ValueError(f"{path}: not a readable .npy array: {array_error(e)}") from None
    if not isinstance(x, np.ndarray):
        x.close()
        raise ValueError(f"{path}: is an .npz archive, expected one .npy array")
    return x


@contextmanager
def open_npz(path: str | Path) -> Iterator[Any]:
    """The archive of the .npz file ``path`` (numpy's NpzFile); read its arrays with ``npz_array``."""
    try:
        z = np.load(path, allow_pickle=False)
    except UNREADABLE as e:
        raise ValueError(f"{path}: not a readable .npz archive: {array_error(e)}") from None
    if isinstance(z, np.ndarray):
        raise ValueError(f"{path}: holds one .npy array, expected an .npz archive")
    with z:
        yield z


def npz_array(z: Any, key: str, path: str | Path) -> np.ndarray:
    """The array ``key`` of an archive from ``open_npz(path)``."""
    try:
        return z[key]
    except UNREADABLE as e:
        raise ValueError(f"{path}: array {key!r} cannot be read: {array_error(e)}") from None
