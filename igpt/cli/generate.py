"""Generation commands: ``sample`` (unconditional images) and ``complete`` (the paper's half-image
completions; iterative infilling for BERT checkpoints).

    igpt sample --checkpoint runs/c10 --n-images 64 --out samples/    # 64 PNGs + grid.png + provenance.json
    igpt complete --checkpoint runs/c10 --images cat.jpg --out fig/   # original | top half | 4 completions
"""

from __future__ import annotations

import argparse

from igpt.cli.args import build
from igpt.config import EvalDataConfig, SampleConfig
from igpt.generate.complete import complete, sample_images


def cmd_sample(args: argparse.Namespace) -> None:
    r = sample_images(args.checkpoint, args.out, n_images=args.n_images, cfg=build(SampleConfig, args),
                      ncol=args.ncol, scale=args.scale, overwrite=args.overwrite)
    side = r["image_side"]
    print(f"{r['n_images']} samples at {side}x{side} -> {r['out']}/sample-*.png, grid.png and "
          "provenance.json")


def cmd_complete(args: argparse.Namespace) -> None:
    r = complete(args.checkpoint, args.out, images=args.images, data=build(EvalDataConfig, args),
                 n_images=args.n_images, offset=args.offset, keep=args.keep, rows=args.rows,
                 n_samples=args.n_samples, rounds=args.rounds, schedule=args.schedule,
                 cfg=build(SampleConfig, args), scale=args.scale, overwrite=args.overwrite)
    print(f"{len(r['names'])} input(s) from {r['inputs']}: kept {r['rows_kept']} of {r['n_px']} rows, "
          f"{r['n_samples']} completion(s) each {r['how']} -> {r['out']}/completions.png and "
          f"{len(r['names'])} complete-*.png")
