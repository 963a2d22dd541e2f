"""igpt convert: read OpenAI's released checkpoints or a Hugging Face ImageGPT directory; write either format.

    igpt convert --from openai --checkpoint CKPT_PREFIX --out CKPT_DIR [--palette kmeans_centers.npy]
    igpt convert --from hf --checkpoint SRC_DIR_OR_HUB_ID --out CKPT_DIR
    igpt convert --to hf --checkpoint CKPT_OR_RUN_DIR --out DST_DIR   (a fine-tuned one: an image classifier)
    igpt convert --consolidate --checkpoint SHARDED_CKPT_OR_RUN_DIR --out CKPT_DIR
"""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import add_checkpoint, command


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
    p.set_defaults(handler="igpt.cli.convert:cmd_convert")
