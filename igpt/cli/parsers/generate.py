"""The flags of ``igpt sample`` and ``igpt complete`` (handlers: ``igpt.cli.generate``)."""

from __future__ import annotations

from typing import Any

from igpt.cli.args import add_checkpoint, add_eval_data, add_fields, add_overwrite, command, integer
from igpt.config import SCHEDULES, SampleConfig


def _sample_parser(sub: Any) -> None:
    p = command(sub, "sample", help="unconditional samples of an AR checkpoint: PNGs plus a grid")
    add_checkpoint(p)
    p.add_argument("--n-images", type=integer, default=64, help="number of images (default: 64)")
    p.add_argument("--out", required=True,
                   help="output directory (sample-NNNN.png, grid.png, provenance.json)")
    p.add_argument("--ncol", type=integer, default=8, help="images per row of grid.png (default: 8)")
    p.add_argument("--scale", type=integer, default=4,
                   help="enlargement of every image written (sample-NNNN.png and grid.png), nearest neighbour "
                   "(default: 4)")
    add_fields(p, SampleConfig, title="sampling")
    add_overwrite(p)
    p.set_defaults(handler="igpt.cli.generate:cmd_sample")


def _complete_parser(sub: Any) -> None:
    p = command(sub, "complete", help="complete the bottom of real images (AR: sampling; BERT: iterative "
                "infilling); writes the paper's figure")
    add_checkpoint(p)
    p.add_argument("--images", nargs="+", default=None, metavar="FILE", help="image files to complete")
    add_eval_data(p, required=False)
    p.add_argument("--n-images", type=integer, default=8, help="with --data: how many images (default: 8)")
    p.add_argument("--offset", type=integer, default=0, help="with --data: index of the first image (default: 0)")
    p.add_argument("--keep", type=float, default=0.5,
                   help="fraction of the rows kept from the top, rounded to whole rows (default: 0.5)")
    p.add_argument("--rows", type=integer, default=None, help="rows kept from the top (overrides --keep)")
    p.add_argument("--n-samples", type=integer, default=4, help="completions per input (default: 4)")
    p.add_argument("--rounds", type=integer, default=8, help="BERT: rounds of iterative infilling (default: 8)")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="BERT: how the masked count shrinks over the rounds (default: cosine)")
    p.add_argument("--out", required=True,
                   help="output directory (completions.png, complete-*.png, provenance.json)")
    p.add_argument("--scale", type=integer, default=4, help="enlargement of the figures, nearest neighbour (default: 4)")
    add_fields(p, SampleConfig, title="sampling")
    add_overwrite(p)
    p.set_defaults(handler="igpt.cli.generate:cmd_complete")


def register(sub: Any) -> None:
    _sample_parser(sub)
    _complete_parser(sub)
