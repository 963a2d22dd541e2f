"""Files and directories that appear whole or not at all.

Everything igpt writes goes through a temporary name in the same directory (``.NAME.tmp-PID``) and one
``os.replace``, so a reader, or a run killed at any moment (even by SIGKILL), sees the old file or the new
one and never half of one. A temporary name in the same directory keeps the rename on one filesystem,
where it is atomic. Files are opened normally, so they follow the umask like any other output.
``read_json`` and ``load_array`` read such files back, with a one-line error naming the file; arrays are
read with pickles off, so an object array or a pickle in their place is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; when the block ends normally it is renamed over
    ``path``, and when it raises, whatever was written is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)  # left by an earlier process of the same PID that was killed
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextmanager
def replacing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary directory beside ``path``, filled by the caller; on success it takes
    ``path``'s place (an existing ``path`` is moved aside first, then deleted), on failure it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        move_into_place(tmp, path)
    finally:
        _remove(tmp)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished directory ``tmp`` to ``path``. A directory cannot be renamed over a non-empty
    one, so an existing ``path`` is first renamed aside and deleted after: at every moment ``path`` is
    absent for one rename at most, and never half written."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys (stable diffs between runs), written atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; FileNotFoundError or a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def require_new(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Outputs that are written whole (converted checkpoints, exports) never overwrite: ``path`` must not
    exist, or be an empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{flag} {path} already exists and is not empty; choose a new directory")
    return path


def array_error(e: Exception) -> str:
    """numpy's reason in one line; its pickle refusals (which go on to suggest unpickling) in our words."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "pickled" in text:  # np.load takes any file that is neither .npy nor .npz for a pickle
        return "not a .npy or .npz array file (numpy would unpickle it, which igpt never does)"
    if "Object arrays" in text or "Python objects" in text:
        return "an array of pickled Python objects, which igpt never unpickles"
    return text


def load_array(path: str | os.PathLike, mmap_mode: str | None = None) -> Any:
    """``np.load`` with pickles off: an ndarray for .npy (memory-mapped with ``mmap_mode``), an open NpzFile
    for .npz (read its arrays with ``npz_member``). A one-line ValueError naming the file when it is not one."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: {array_error(e)}") from None


def npz_member(npz: Any, key: str, path: str | os.PathLike) -> np.ndarray:
    """Array ``key`` of an NpzFile opened by ``load_array`` (arrays are read on access, so this is where an
    object array is refused); a one-line ValueError naming the file and key."""
    try:
        return npz[key]
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: {key}: {array_error(e)}") from None
