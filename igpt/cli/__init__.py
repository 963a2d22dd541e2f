"""Command line: ``igpt <command>`` (also ``python -m igpt``).

Each family of commands has two modules. ``igpt.cli.parsers.<family>`` builds its flags (a
``register(subparsers)`` function) from the config dataclasses (``igpt.cli.args``), so every default, help
text and set of choices is defined once, in ``igpt.config``; it imports neither torch nor the library, and
names each command's handler as a string, ``set_defaults(handler="igpt.cli.train:cmd_pretrain")``.
``igpt.cli.<family>`` holds the handlers, which call one library function and print. ``main`` parses first,
then imports the one handler named (and with it the library and torch) and runs it through
``igpt.cli.dispatch``, which turns expected errors into one line and an exit status. So ``igpt --help`` and
``igpt CMD --help`` take a fraction of a second (tests/test_startup.py). The handler is named rather than
imported because importing it is what costs seconds; nothing below the command line is reached this way.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from igpt.cli.args import parse
from igpt.cli.parsers import bench, convert, data, evaluate, generate, serve, tokenizer, train

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
    return set(vars(parse(parser, argv)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(make_parser(), argv)
    args.given = _given(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for reports that name it
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The library and torch come only now: the command's handler, and the runner that reports its errors
    args.func = named(args.handler)
    return named("igpt.cli.dispatch:run")(args)


def named(name: str) -> Callable[..., Any]:
    """The function ``"module:function"`` names, its module imported now (a handler ``set_defaults`` named)."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


if __name__ == "__main__":
    sys.exit(main())
