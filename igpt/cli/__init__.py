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
from igpt.distributed import PeerLostError
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
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except PeerLostError as e:
        print(f"igpt {args.command}: error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit at once: releasing the broken process group's objects (DDP's reducer, pending collectives)
        # can block forever in their C++ destructors, and everything worth keeping is already on disk.
        os._exit(2)
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
