"""igpt convert: read OpenAI's released checkpoints or a Hugging Face ImageGPT directory; write either format.

    igpt convert --from openai --checkpoint CKPT_PREFIX --out CKPT_DIR [--palette kmeans_centers.npy]
    igpt convert --from hf --checkpoint SRC_DIR_OR_HUB_ID --out CKPT_DIR
    igpt convert --to hf --checkpoint CKPT_OR_RUN_DIR --out DST_DIR   (a fine-tuned one: an image classifier)
    igpt convert --consolidate --checkpoint SHARDED_CKPT_OR_RUN_DIR --out CKPT_DIR
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from igpt.cli.args import add_checkpoint, command
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


def register(sub: Any) -> None:
    p = command(sub, "convert", help="convert OpenAI / Hugging Face ImageGPT weights to and from igpt",
                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src_format", choices=("hf", "openai"),
                     help="import: --checkpoint is a Hugging Face ImageGPT directory or Hub id (hf) or a "
                          "released TensorFlow checkpoint prefix such as model.ckpt-1000000 (openai)")
    way.add_argument("--to", dest="to", choices=("hf",),
                     help="export: --checkpoint is an igpt checkpoint or run directory, written as a Hugging "
                          "Face ImageGPT directory with a model card (a fine-tuned checkpoint as "
                          "ImageGPTForImageClassification with its class names)")
    way.add_argument("--consolidate", action="store_true",
                     help="--checkpoint is a sharded checkpoint (pretrain --sharded-checkpoint) or a run "
                          "directory holding them; write its newest as one model.safetensors checkpoint")
    add_checkpoint(p, "what to convert (see --from, --to and --consolidate)")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--palette", default=None,
                   help="--from openai: OpenAI's kmeans_centers.npy (default: the one beside the checkpoint)")
    p.add_argument("--objective", default=None, choices=("ar", "bert"),
                   help="--from openai: override the objective (default: 'ar' when model/sos exists, "
                        "else 'bert')")
    p.set_defaults(func=cmd_convert)
