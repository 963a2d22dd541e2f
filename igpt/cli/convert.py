"""``igpt convert``: the handler; its flags and ``--help`` text (this command's usage) are in
``igpt.cli.parsers.convert``."""

from __future__ import annotations

import argparse
import json

from igpt.weights.card import PROCESSOR_NOTE, SOS_NOTE
from igpt.weights.convert import consolidate, convert_hf, convert_openai, export_hf


def cmd_convert(args: argparse.Namespace) -> None:
    if (args.palette or args.objective) and args.src_format != "openai":
        raise ValueError("--palette and --objective apply to --from openai only (an ImageGPT directory carries "
                         "its palette and is always AR; an igpt checkpoint records both)")
    if args.consolidate:
        out = consolidate(args.checkpoint, args.out)
        print(f"wrote single-file igpt checkpoint {out} (load it with igpt.load({str(out)!r}))")
    elif args.to is not None:
        out = export_hf(args.checkpoint, args.out)
        kind = json.loads((out / "config.json").read_text())["architectures"][0]
        print(f"wrote Hugging Face {kind} directory {out} (config.json, model.safetensors, "
              f"preprocessor_config.json, README.md model card)")
        print(f"note: {PROCESSOR_NOTE}")
        print(f"note: {SOS_NOTE}")
    else:
        out = (convert_hf(args.checkpoint, args.out) if args.src_format == "hf" else
               convert_openai(args.checkpoint, args.out, palette=args.palette, objective=args.objective))
        print(f"wrote igpt checkpoint {out} (load it with igpt.load({str(out)!r}))")
