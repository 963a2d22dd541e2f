"""``igpt bench quality pack|run``, the CIFAR-10 quality protocol (``igpt.bench.quality``): the handlers; the
flags and the protocol's description (its ``--help``) are in ``igpt.cli.parsers.quality``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from igpt.bench.quality import CACHE, build_cache, pack, quality_run, run_on_cache, summary
from igpt.cli.args import build
from igpt.config import QualityConfig
from igpt.eval.probe import format_table


def cmd_pack(args: argparse.Namespace) -> None:
    out = pack(args.data, Path(args.out), n_px=args.n_px, k=args.vocab_size, palette_file=args.palette,
               lzma_preset=args.lzma_preset, device=args.device)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (palette, ids of train/val/test, test_lossless)")


def cmd_run(args: argparse.Namespace) -> None:
    cfg, out = build(QualityConfig, args), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = {"seconds": args.minutes * 60, "steps": args.steps, "command": shlex.join(["igpt", *args.argv])}
    if args.ids:
        results = quality_run(args.ids, out, cfg, flag="--ids", **budget)
    else:  # the data itself: palette and ids made here first (once; a later run reuses them)
        cache = out / CACHE
        if not (cache / "meta.json").is_file():
            build_cache(args.data, cache, args.n_px or 32, 512, None, args.device)
        results = run_on_cache(cache, out, cfg, **budget)
    print(format_table(results["probe_trained"], baseline=results["probe_init"]))
    print("\n" + "\n".join(summary(results)))
    print(f"outputs: {out}/results.json, {out}/probe.png")
