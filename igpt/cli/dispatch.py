"""Running a parsed command (``igpt.cli.main`` comes here after parsing, with ``args.func``, the handler its
parser named): expected errors become one line on stderr and an exit status. Apart from the parsers because
this needs ``igpt.distributed``, and so torch, which ``--help`` must not wait for."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from igpt.distributed import PeerLostError, launched_by_torchrun
from igpt.stop import EXIT_STOPPED, Stopped


def run(args: argparse.Namespace) -> int:
    code = _run(args)
    if launched_by_torchrun():
        # One of several torchrun processes leaves at once, its outputs flushed: the process group was left
        # (igpt.distributed.shutdown), but objects that still hold it (FSDP's device mesh, DDP's reducer)
        # are freed only while the interpreter shuts down, and gloo's worker threads then abort the
        # finished process now and then ("terminate called without an active exception", SIGABRT, a
        # failed torchrun). Every file is already written atomically and closed.
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    """Run the command; its exit status, with expected errors as one line on stderr."""
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except PeerLostError as e:
        print(f"igpt {args.command}: error: {e}", file=sys.stderr)
        # Exit at once: releasing the broken process group's objects (DDP's reducer, pending collectives)
        # can block forever in their C++ destructors, and everything worth keeping is already on disk.
        _exit_now(2)
    except Stopped as e:
        print(f"igpt {args.command}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # a second Ctrl-C: what was saved is whole (every write is atomic)
        print(f"igpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"igpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
