"""The CIFAR-10 quality protocol: pretrain on the CIFAR-10 train set, probe every layer.

The command line of ``igpt.bench.quality``, which holds the implementation; ``igpt bench report --quality
IDS`` runs the same ``run`` on a ``pack`` file as its last part, its pretraining shortened to what the
report's budget has left (docs/benchmarks.md). The model, pretraining and probe flags of ``run`` come from
``igpt.config.QualityConfig``, the defaults both share.

Two steps, so that what a GPU machine receives stays small (its uploads are limited to 64 MiB):

1. ``pack`` (CPU, once): fit the 512-colour palette on the 50,000 training images, quantize train and
   test with ``igpt prepare`` (10% of train carved out, seeded, for the validation loss) and write that
   ids cache, the palette and ``test_lossless.npy`` into one lzma-compressed tar (38 MiB; about 6 minutes on
   one busy CPU core)::

       OMP_NUM_THREADS=1 python scripts/cifar_quality.py pack --data ../shared/data/cifar10.npz \\
           --out cifar10-ids.tar.xz

2. ``run`` (one GPU, everything included, about 10 minutes): unpack, pretrain a fixed configuration for
   a wall-clock budget (``--minutes``; a short calibration run measures the step time first) or for
   ``--steps``, extract features of every layer for all 50,000 training and 10,000 test images, probe
   them (L-BFGS logistic regression, L2 chosen on a carve of train) and do the same for the same
   architecture at random initialisation::

       python scripts/cifar_quality.py run --ids cifar10-ids.tar.xz --out runs/quality

   It reports the accuracy on the 1,000 bit-exact test images (``test_lossless``) and on all 10,000 (the
   other 9,000 went through JPEG, which moves their palette ids), for the best layer (chosen by validation
   accuracy) and, with ``--concat K``, for the K layers around it concatenated; prints a table and writes
   ``OUT/results.json`` and ``OUT/probe.png`` (trained against random init).

``run --data ../shared/data/cifar10.npz`` instead of ``--ids`` does the packing steps in-process (the
palette is then fitted on the GPU). Scaled down for a CPU, e.g.: ``pack --data .../cifar10-small.npz
--n-px 16`` and ``run ... --preset igpt-demo --n-embd 64 --minutes 2 --compile off --batch-size 32 --device cpu``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from igpt.bench.quality import CACHE, build_cache, pack, quality_run, run_on_cache, summary
from igpt.cli.args import add_fields, build
from igpt.config import QualityConfig
from igpt.eval.probe import format_table


def cmd_pack(args: argparse.Namespace) -> None:
    out = pack(args.data, Path(args.out), n_px=args.n_px, k=args.palette_k, palette_file=args.palette,
               lzma_preset=args.preset, device=args.device)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (palette, ids of train/val/test, test_lossless)")


def cmd_run(args: argparse.Namespace) -> None:
    cfg, out = build(QualityConfig, args), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = {"seconds": args.minutes * 60, "steps": args.steps, "command": args.command_line}
    if args.ids:
        results = quality_run(args.ids, out, cfg, flag="--ids", **budget)
    else:  # the npz itself: palette and ids made here first (once; a later run reuses them)
        cache = out / CACHE
        if not (cache / "meta.json").is_file():
            build_cache(args.data, cache, args.n_px or 32, 512, None, args.device)
        results = run_on_cache(cache, out, cfg, **budget)
    print(format_table(results["probe_trained"], baseline=results["probe_init"]))
    print("\n" + "\n".join(summary(results)))
    print(f"outputs: {out}/results.json, {out}/probe.png")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, help="step of the protocol")
    p = sub.add_parser("pack", help="palette fit + quantize on CPU -> one compact .tar.xz")
    p.add_argument("--data", required=True, help="an npz with x_train/y_train/x_test/y_test/test_lossless")
    p.add_argument("--out", required=True, help="the .tar.xz to write")
    p.add_argument("--n-px", type=int, default=32, help="image side (default: 32)")
    p.add_argument("--palette-k", type=int, default=512, help="palette colours (default: 512)")
    p.add_argument("--palette", default=None, help="use this palette file instead of fitting one")
    p.add_argument("--preset", type=int, default=6, help="lzma preset 0-9 (default: 6)")
    p.add_argument("--device", default="auto", help="where the palette is fitted (default: auto)")
    p.set_defaults(func=cmd_pack)

    run = sub.add_parser("run", help="pretrain, probe every layer, compare with random init")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="a file written by pack")
    src.add_argument("--data", help="the npz itself: fit the palette and quantize here first")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--minutes", type=float, default=5.5, help="pretraining wall-clock budget (default: 5.5)")
    run.add_argument("--steps", type=int, default=0, help="pretrain this many steps instead of --minutes")
    run.add_argument("--n-px", type=int, default=None, help="with --data: quantize at this side (default: 32); "
                     "with --ids the packed side is used")
    add_fields(run, QualityConfig, title="model, pretraining and probe")  # the same settings as bench report's
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.command_line = shlex.join(["python", "scripts/cifar_quality.py", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cifar_quality {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
