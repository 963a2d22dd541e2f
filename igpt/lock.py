"""One writer per output directory: an OS file lock held for the life of the process that writes it.

Two ``igpt pretrain --out R`` at once, or a ``--resume R`` while R still trains, would interleave metrics and
mix one run's weights into the other's checkpoints. ``DirLock`` takes ``flock(LOCK_EX)`` on ``DIR/.lock``;
the kernel releases it when the holder exits, however it exits (SIGKILL included), so a stale lock never
blocks a real resume. The holder's PID and command are written into the file for the refusal message.
Readers (``igpt.load``, probes, sampling) take no lock. Nothing is deleted or replaced under a lock another
process holds: ``igpt.atomic.check_output`` refuses such an output, and ``remove_unheld`` deletes a directory
only while it holds the locks inside it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from igpt.atomic import LOCK_FILE, check_writable, lock_holder, remove_dir


class DirLock:
    """``with DirLock(path, what="--out"):`` holds the directory's lock, or raises a one-line ValueError
    naming the process that holds it. The directory must exist."""

    def __init__(self, path: str | os.PathLike, flag: str = "--out") -> None:
        self.path, self.flag, self.fd = Path(path), flag, -1
        self.created = False  # by claim_new: whether the directory did not exist before

    def acquire(self) -> "DirLock":
        lock = self.path / LOCK_FILE
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"{self.flag} {self.path} is in use by {holder}: one process writes a run "
                             "directory at a time; wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "DirLock":
        return self if self.fd >= 0 else self.acquire()  # claim_new's lock is already held

    def __exit__(self, *exc: object) -> None:
        self.release()

    def discard(self) -> None:
        """Undo a new output that failed before it held anything worth keeping (a bad input): the directory
        goes back to absent, or to empty when it existed before ``claim_new``."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for p in self.path.iterdir():
            if p.name != LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def claim_new(path: str | os.PathLike, *, marker: str, what: str, resume_flag: str = "--resume") -> DirLock:
    """The lock of a new output directory, which must be absent or empty; a directory holding ``marker``
    is ``what`` (a run, a fine-tune) to continue with ``resume_flag``, and either way is refused with one line.
    A user's non-empty directory is never given a lock file."""
    path = Path(path)
    check_writable(path, "--out")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory")

    def refuse() -> ValueError:
        if (path / marker).exists():
            return ValueError(f"--out {path} already holds {what}: continue it with {resume_flag} {path}, or "
                              "choose another --out")
        return ValueError(f"--out {path} is not empty; {what} starts in a new or empty directory")

    def others() -> bool:
        return path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir())

    if others() and not (path / LOCK_FILE).exists():
        raise refuse()
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = DirLock(path, "--out").acquire()  # refuses, naming the holder, while another process writes it
    if others():  # written by a process that held the lock a moment ago
        lock.release()
        raise refuse()
    lock.created = created
    return lock


def remove_unheld(paths: list[Path], flag: str = "--out") -> None:
    """Delete the directories ``paths``, which lie in the one ``flag`` names (``igpt.atomic.remove_dir``),
    holding the lock of every directory in them that has one from before the first is touched until they
    are gone: a process writing one of them (a run resumed by hand) is never deleted from under, and cannot
    start meanwhile. One held by another process is refused, naming it, and then nothing is deleted."""
    held: list[DirLock] = []
    try:
        for path in paths:
            for lock in sorted(path.rglob(LOCK_FILE)) if path.is_dir() else []:
                who = lock_holder(lock.parent)
                if who is not None:
                    raise ValueError(f"{flag} {path.parent}: {lock.parent} is in use by {who}; it would be "
                                     "deleted: wait for that process to finish or stop it first")
                held.append(DirLock(lock.parent, flag).acquire())  # a process that started since is named too
        for path in paths:
            remove_dir(path)
    finally:
        for lock in held:
            lock.release()
