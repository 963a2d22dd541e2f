"""One writer per output directory: an OS file lock held for the life of the process that writes it.

Two ``igpt pretrain --out R`` at once, or a ``--resume R`` while R still trains, would interleave metrics and
mix one run's weights into the other's checkpoints. ``DirLock`` takes ``flock(LOCK_EX)`` on ``DIR/.lock``;
the kernel releases it when the holder exits, however it exits (SIGKILL included), so a stale lock never
blocks a real resume. The holder's PID and command are written into the file for the refusal message.
Readers (``igpt.load``, probes, sampling) take no lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

LOCK_FILE = ".lock"


class DirLock:
    """``with DirLock(path, what="--out"):`` holds the directory's lock, or raises a one-line ValueError
    naming the process that holds it. The directory must exist."""

    def __init__(self, path: str | os.PathLike, flag: str = "--out") -> None:
        self.path, self.flag, self.fd = Path(path), flag, -1

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
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
