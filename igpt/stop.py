"""Stopping long work cleanly on SIGTERM (what clusters send before preemption) and Ctrl-C (SIGINT).

The first signal sets a flag that the work polls between steps: it finishes the step, saves what it has
(a checkpoint, for training) and raises ``Stopped``, whose message says how to continue. The ``igpt``
command prints that one line and exits with ``EXIT_STOPPED``. A second signal stops at once: the handlers
are back to Python's defaults by then, so it raises KeyboardInterrupt (Ctrl-C) or ends the process
(SIGTERM). Whatever was on disk stays whole, since every file is written atomically (``igpt.atomic``).

Before the first step there is nothing to save, and the setup (reading and decoding the data, fitting a
tokenizer) can take long without a step to end: inside ``stop.at_once()`` the first signal raises ``Stopped``
at once, wherever the main thread is, as Ctrl-C's KeyboardInterrupt would.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL in sysexits.h: "try again later", i.e. resume
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Work ended early on request, after saving what it had; the message says how to continue."""


class _StopNow(BaseException):
    """What the handler raises inside ``at_once``: a BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on its way takes it for a failure of the code it interrupted (an unreadable file)."""


class GracefulStop:
    """``with GracefulStop("pretrain") as stop: ... if stop.requested: save(); raise Stopped(...)``.

    Handlers are installed only in the main thread (Python allows no other) and the previous ones are put
    back on exit, so a library caller's own handlers survive."""

    def __init__(self, what: str) -> None:
        self.what, self.signal_name, self._previous = what, "", {}
        self._at_once = False

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)

    def request(self, name: str) -> None:
        """Ask for a stop as a signal would (for ranks that learn of it from another rank, and tests)."""
        self.signal_name = self.signal_name or name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.request(name)
        self._restore()  # the next signal gets the default behaviour: stop at once
        if self._at_once:
            raise _StopNow
        log.warning("%s: %s received; stopping after this step (send it again to stop at once)", self.what, name)

    @contextmanager
    def at_once(self) -> Iterator[None]:
        """Within this block (the setup before a first step) a signal stops the work at once: ``Stopped``
        ("stopped by SIGTERM before the first step") comes out of the block, and the caller says what was
        kept and how to continue."""
        self._at_once = True
        try:
            if self.requested:
                raise _StopNow
            yield
        except _StopNow:
            raise Stopped(f"stopped by {self.signal_name} before the first step") from None
        finally:
            self._at_once = False

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
