"""Command line: ``igpt <command>`` (also ``python -m igpt``).

Each family of commands lives in its own module with a ``register(subparsers)`` function and handlers that
parse, call one library function and print. Flags come from the config dataclasses (``igpt.cli.args``), so
every default and help text is defined once, in ``igpt.config``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from igpt.cli import bench, convert, data, evaluate, generate, serve, tokenizer, train
from igpt.distributed import PeerLostError, launched_by_torchrun
from igpt.stop import EXIT_STOPPED, Stopped

COMMAND_MODULES = (data, tokenizer, train, evaluate, generate, convert, bench, serve)


def _version() -> str:
    try:
        return version("igpt")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igpt", description="Image GPT: generative pretraining from pixels")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    parser.add_argument("--version", action="version", version=f"igpt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, help="what to do")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def _given(argv: Sequence[str] | None) -> set[str]:
    """The flags written on the command line, as opposed to left at their defaults: the same parser, every
    default suppressed, parses the same arguments."""
    parser = make_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest not in ("help", "version"):
                action.default = argparse.SUPPRESS
        p._defaults.clear()
    return set(vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.given = _given(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for reports that name it
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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


if __name__ == "__main__":
    sys.exit(main())
