"""Files and directories that appear whole or not at all.

Everything igpt writes goes through a temporary name in the same directory (``.NAME.tmp-PID``) and one
``os.replace``, so a reader, or a run killed at any moment (even by SIGKILL), sees the old file or the new
one and never half of one. A temporary name in the same directory keeps the rename on one filesystem,
where it is atomic. Files are opened normally, so they follow the umask like any other output.
``read_json`` and ``load_array`` read such files back, with a one-line error naming the file; arrays are
read with pickles off, so an object array or a pickle in their place is refused, never unpickled.
``check_output`` checks an output before any work, and refuses one under the lock another process holds
(``igpt.lock.DirLock``): nothing is replaced from under a process that writes it.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"  # the file igpt.lock.DirLock holds flock on while its process writes a directory


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
    check_writable(path, flag)
    return path


def check_output(path: str | os.PathLike, flag: str = "--out", *, overwrite: bool = False,
                 is_dir: bool = True, writes: tuple[str, ...] = (), by: str = "") -> Path:
    """Checked before any work: an output directory (``is_dir``) or file that can be written, and that
    holds nothing yet unless ``overwrite`` (the ``--overwrite`` flag) says its contents may be replaced.

    ``writes`` is for a directory that is replaced whole (``replacing_dir``): the names (glob patterns) of
    the files the command ``by`` writes into it, the first of which every such output holds. ``overwrite``
    then replaces only such an output, never a directory holding anything else (a run, a lock, a user's
    files), and the directory must not be the current one or hold it."""
    path = Path(path)
    if writes:
        _check_not_cwd(path, flag, by)
    _check_unheld(path, flag)
    if path.exists():
        if is_dir and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file, not a directory")
        if not is_dir and path.is_dir():
            raise ValueError(f"{flag} {path} is a directory, not a file")
        if not overwrite and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another")
        if writes and is_dir:
            _check_written_by(path, flag, writes, by)
    check_writable(path, flag)
    return path


def lock_holder(directory: str | os.PathLike) -> str | None:
    """Who holds ``directory``'s lock (``igpt.lock.DirLock``): "process PID (command)" while another live
    process does, else None. It takes the lock for an instant to find out (the kernel keeps no other record),
    and creates no lock file."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file, so no holder
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        return None if who.startswith(f"process {os.getpid()} ") else who  # this process's own lock
    finally:
        os.close(fd)  # drops the lock if it was taken
    return None


def _check_unheld(path: Path, flag: str) -> None:
    """Nothing is replaced under a lock another process holds: an existing output directory whose lock is
    held, or an existing file in one (a run's tokenizer while the run trains), is refused, naming the holder."""
    directory = path if path.is_dir() else path.parent if path.exists() else None
    who = lock_holder(directory) if directory is not None else None
    if who is not None:
        where = f"{flag} {path}" if directory == path else f"{flag} {path}: {directory}"
        raise ValueError(f"{where} is in use by {who}; nothing in it is replaced while that process writes it: "
                         "wait for it to finish or stop it first")


def _check_not_cwd(path: Path, flag: str, by: str) -> None:
    """Replacing a directory renames it aside and deletes it: the current directory, or one holding it,
    would vanish from under the shell that ran the command (and ``.`` has no name to put a new one under)."""
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise ValueError(f"{flag} {path} is the current directory or holds it, which {by} would replace whole; "
                         "name a new directory inside it instead")


def _check_written_by(path: Path, flag: str, writes: tuple[str, ...], by: str) -> None:
    """A non-empty ``path`` is an earlier output of ``by``: its files all match ``writes``, ``writes[0]``
    among them. Names, not contents, decide: that is what ``--overwrite`` may delete."""
    names = sorted((p.name for p in path.iterdir()), key=lambda n: (n.startswith("."), n))  # visible names first
    if not names:
        return
    foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, w) for w in writes)]
    if foreign or not (path / writes[0]).is_file():
        why = f"holds {foreign[0]}, which {by} does not write" if foreign else f"has no {writes[0]}"
        raise ValueError(f"{flag} {path} {why}, so it is not an earlier output of {by}, the only directory it "
                         f"replaces: choose another {flag}")


def check_writable(path: Path, flag: str) -> None:
    """``path`` (or, when it does not exist yet, its nearest existing parent) can be written."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir() and existing != path:
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise ValueError(f"{flag} {path}: {existing} is not writable")


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, briefly
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the mode an ordinary ``open`` would have: some writers (safetensors) create theirs 0600,
    which teammates reading a run on a shared filesystem cannot open."""
    os.chmod(path, 0o666 & ~current_umask())


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that readers see it whole or not at all: it is renamed to a hidden name first
    (one atomic step), then deleted. A reader that finds it gone looks again (``igpt.load`` does)."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(doomed)
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    _remove(doomed)


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary names (``.NAME.tmp-PID``, ``.NAME.old-PID``) that writes killed part-way left in
    ``directory``. Only the directory's one writer (``igpt.lock.DirLock``) may call this."""
    directory = Path(directory)
    found = [p for p in directory.glob(".*") if ".tmp-" in p.name or ".old-" in p.name] if directory.is_dir() else []
    for p in found:
        _remove(p)
    return found


# How a full disk, a quota or a file-size limit (RLIMIT_FSIZE) shows through the writers igpt uses: an errno
# from Python, "os error N" from safetensors, a short write from numpy and torch.save.
_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_SPACE_TEXTS = tuple(f"os error {n}" for n in _SPACE_ERRNOS) + (
    "No space left", "File too large", "Disk quota", "unexpected pos", "requested and", "file write failed")


def write_error(e: BaseException, path: str | os.PathLike, needed_bytes: int) -> Exception:
    """The one-line error of a failed write of ``path`` (a file or a directory of ``needed_bytes``)."""
    text = str(e)
    if getattr(e, "errno", None) in _SPACE_ERRNOS or any(s in text for s in _SPACE_TEXTS):
        return ValueError(f"no space left writing {path}: {needed_bytes / 2**20:.0f} MB needed "
                          f"({text.strip().splitlines()[-1][:120] if text.strip() else type(e).__name__})")
    if isinstance(e, OSError):
        return ValueError(f"cannot write {path}: {e.strerror or e}")
    return e if isinstance(e, Exception) else RuntimeError(text)
