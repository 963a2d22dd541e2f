"""igpt bench quality pack|run: the CIFAR-10 quality protocol (igpt.bench.quality). It pretrains on the
CIFAR-10 train set and probes every layer beside random initialisation.

Two steps, so that what a GPU machine receives stays small:

    igpt bench quality pack --data cifar-10-batches-py --out cifar10-ids.tar.xz   # CPU, once (~6 min, 38 MiB)
    igpt bench quality run --ids cifar10-ids.tar.xz --out runs/quality            # one GPU, ~10 min

pack fits the 512-colour palette on the training images and writes the ids cache (10% of train carved out
for the validation loss), the palette and the mask of bit-exact test images (all of them for torchvision's
cifar-10-batches-py; an npz's own test_lossless array) into one lzma tar. run pretrains a fixed
configuration for --minutes (or --steps), probes every layer of the model and of its random initialisation,
prints the table and writes OUT/results.json and OUT/probe.png. igpt bench report --quality IDS runs the
same run as its last part. The protocol and its numbers: docs/evaluation.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import add_fields, add_renamed, command, integer
from igpt.config import QualityConfig


def register(bsub: Any) -> None:
    """``quality`` under ``igpt bench``, with its ``pack`` and ``run`` steps."""
    q = command(bsub, "quality", help="the CIFAR-10 quality protocol: pack (CPU), then run (GPU): pretrain, "
                "probe every layer beside random init", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    qsub = q.add_subparsers(dest="quality_command", required=True, help="step of the protocol")
    p = command(qsub, "pack", help="palette fit + quantize on the CPU -> one compact .tar.xz")
    p.add_argument("--data", required=True, help="CIFAR-10: a cifar-10-batches-py folder, or an npz with "
                   "x_train/y_train/x_test/y_test (and test_lossless)")
    p.add_argument("--out", required=True, help="the .tar.xz to write")
    p.add_argument("--n-px", type=integer, default=32, help="image side (default: 32)")
    add_renamed(p, "--vocab-size", "--palette-k", type=integer, default=512, help="palette colours (default: 512)")
    p.add_argument("--palette", default=None, help="use this palette file instead of fitting one")
    p.add_argument("--lzma-preset", type=integer, default=6, help="lzma preset 0-9 (default: 6)")
    p.add_argument("--device", default="auto", help="where the palette is fitted (default: auto)")
    p.set_defaults(handler="igpt.cli.quality:cmd_pack")

    run = command(qsub, "run", help="pretrain, probe every layer, compare with random init")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="a file written by pack")
    src.add_argument("--data", help="the data itself: fit the palette and quantize here first")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--minutes", type=float, default=5.5, help="pretraining wall-clock budget (default: 5.5)")
    run.add_argument("--steps", type=integer, default=0, help="pretrain this many steps instead of --minutes")
    run.add_argument("--n-px", type=integer, default=None, help="with --data: quantize at this side (default: 32); "
                     "with --ids the packed side is used")
    add_fields(run, QualityConfig, title="model, pretraining and probe")  # the same settings as bench report's
    run.set_defaults(handler="igpt.cli.quality:cmd_run")
