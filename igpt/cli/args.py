"""Flags generated from the config dataclasses, so each default and help text is defined once."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_fields(parser: argparse.ArgumentParser, cls: type, *, title: str, preset_fields: bool = False) -> None:
    """One flag per dataclass field (``n_layer`` -> ``--n-layer``) with the field's help. With
    ``preset_fields`` the default is None so that an unset flag keeps the preset's value."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + ("" if preset_fields else f" (default: {f.default})")
        kw: dict[str, Any] = {"dest": f.name, "help": help_text,
                              "default": None if preset_fields else f.default}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(f.default) if f.default is not None else str
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kw)


def build(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Instantiate ``cls`` from parsed flags; flags left at None fall back to ``base`` (a preset)."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


