"""Flags generated from the config dataclasses, so each default, help text and set of choices is written
once, in ``igpt.config``; and the flag groups every command shares (``--checkpoint``, ``--data``,
``--resize``, ``-q``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from igpt.config import DataConfig, EvalDataConfig
from igpt.config.fields import flag


def _default_text(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else str(default)


def integer(text: str) -> int:
    """An int flag's value: a plain integer, or a whole number in float notation (``--n-images 1e8``,
    ``--max-steps 2e5``), which people write for large counts; ``2.5`` stays an error."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # ValueError here is argparse's "invalid int value"
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


integer.__name__ = "int"  # argparse names the type in its error: "invalid int value: '2.5'"


SPELLED = "_spelled_"


def parse(parser: argparse.ArgumentParser, argv: Any) -> argparse.Namespace:
    """``parser.parse_args(argv)`` without the marks ``Renamed`` leaves while parsing, so that the namespace
    holds flags only (a resume compares every flag given with the run's)."""
    args = parser.parse_args(argv)
    for name in [n for n in vars(args) if n.startswith(SPELLED)]:
        delattr(args, name)
    return args


class Renamed(argparse.Action):
    """A flag that also answers to its old name (``--palette`` for ``--tokenizer``), kept for one release so
    that scripts keep working. Both spellings in one command would leave one of them silently unused, so
    that is an error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        mark = SPELLED + self.dest  # which spelling came first, for this parse only (``parse`` drops it)
        first = getattr(namespace, mark, None)
        if first is not None and first != option_string:
            parser.error(f"{first} and {option_string} are one flag ({self.option_strings[1]} is the old name of "
                         f"{self.option_strings[0]}); give it once")
        setattr(namespace, mark, option_string)
        setattr(namespace, self.dest, values)


def add_renamed(group: Any, new: str, old: str, **kw: Any) -> None:
    """``new`` with ``old`` as its alias; the help says which is the old name."""
    kw["help"] = kw.get("help", "") + f" ({old} is its old name, kept for one release)"
    group.add_argument(new, old, action=Renamed, **kw)


def _add(group: Any, f: dataclasses.Field, *, preset: bool, required: bool) -> None:
    help_text = f.metadata["help"].replace("%", "%%")
    if preset:
        help_text += " (default: the preset's)"
    elif not required and "default" not in help_text:  # a help that explains its default says it once
        help_text += f" (default: {_default_text(f.default)})"
    kw: dict[str, Any] = {"dest": f.name, "help": help_text, "default": None if preset else f.default}
    kind = f.metadata.get("type", type(f.default))
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = integer if kind is int else kind
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
    if required:
        kw["required"] = True
        del kw["default"]
    if "old" in f.metadata:
        add_renamed(group, flag(f.name), f.metadata["old"], **kw)
    else:
        group.add_argument(flag(f.name), **kw)


def add_fields(parser: argparse.ArgumentParser, cls: type, *, title: str, preset: bool = False,
               required: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (``n_layer`` -> ``--n-layer``) with the field's help, default and
    choices. With ``preset`` the default is None, so that an unset flag keeps the preset's value. Fields
    with ``cli=False``, fields outside ``only``, and flags the parser already has are left out. A field with
    ``old`` also answers to that old flag name (``Renamed``)."""
    group = parser.add_argument_group(title)
    taken = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) and (only is None or f.name in only) and f.name not in taken:
            _add(group, f, preset=preset, required=f.name in required)


def build(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Instantiate ``cls`` from parsed flags; flags left at None fall back to ``base`` (a preset)."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


# ---- flag groups shared by commands


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``-q`` after the command too; SUPPRESS keeps a ``-q`` given before the command."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors in the log")


def command(sub: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the flags every command has."""
    p = sub.add_parser(name, **kw)
    add_quiet(p)
    return p


def add_checkpoint(parser: argparse.ArgumentParser, help: str = "", required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=required, metavar="PATH",
                        help=help or "weights: an igpt checkpoint, a run directory (its newest checkpoint), a "
                        "Hugging Face ImageGPT folder or a Hub id such as openai/imagegpt-small (from the "
                        "local Hugging Face cache, downloaded there unless HF_HUB_OFFLINE=1; a local path wins)")


def add_data(parser: argparse.ArgumentParser, help: str = "", required: bool = True) -> None:
    """``--data``, as ``igpt.config.DataConfig`` defines it."""
    group = parser.add_argument_group("data")
    f = DataConfig.__dataclass_fields__["data"]
    group.add_argument("--data", required=required, help=(help or f.metadata["help"]).replace("%", "%%"))


def add_labelled_inputs(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """What a probe and a fine-tune read and write: weights, labelled images, an output directory
    (``required=False`` where ``--resume`` may stand in for them)."""
    add_checkpoint(parser, required=required)
    add_data(parser, "labelled dataset, any format 'igpt prepare' accepts, or a prepared cache made with the "
             "checkpoint's tokenizer", required=required)
    parser.add_argument("--out", required=required, help="output directory")
    add_resize(parser)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: the one way to let a command replace an output that already exists."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output of this command (default: refuse, so nothing is lost by accident)")


def add_resize(parser: argparse.ArgumentParser) -> None:
    add_fields(parser, DataConfig, title="images", only=("resize",))


def add_eval_data(parser: argparse.ArgumentParser, required: bool) -> None:
    """The split of ``--data`` a model is scored or completed on (``igpt.config.EvalDataConfig``)."""
    add_fields(parser, EvalDataConfig, title="data", required=("data",) if required else ())
