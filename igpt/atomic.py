"""Files and directories that appear whole or not at all.

Everything igpt writes goes through a temporary name in the same directory (``.NAME.tmp-PID``) and one
``os.replace``, so a reader, or a run killed at any moment (even by SIGKILL), sees the old file or the new
one and never half of one. A temporary name in the same directory keeps the rename on one filesystem,
where it is atomic. Files are opened normally, so they follow the umask like any other output.
``read_json`` reads such a file back, with a one-line error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
