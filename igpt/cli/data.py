"""Data commands: ``igpt palette fit`` and ``igpt prepare``."""

from __future__ import annotations

import argparse

from igpt.atomic import check_output
from igpt.data.open import open_split, prepare
from igpt.tokenizers import Palette, load_tokenizer


def cmd_palette_fit(args: argparse.Namespace) -> None:
    check_output(args.out, "--out", overwrite=args.overwrite, is_dir=False)  # before minutes of k-means
    images = open_split(args.data, "train", n_px=args.n_px, val_fraction=0.0, resize=args.resize)
    if images.pixels is None:
        raise ValueError(f"--data {args.data} holds ids, not pixels: there is nothing to fit")
    palette = Palette.fit(images.pixels, k=args.vocab_size, iters=args.iters, seed=args.seed, progress=True)
    palette.save(args.out)
    meta = palette.meta
    print(f"palette {palette.fingerprint()}: {palette.k} colours from {meta.get('n_pixels', '?')} pixels, "
          f"RMSE {meta.get('mse_uint8', float('nan')) ** 0.5:.2f} (0..255 scale) -> {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    meta = prepare(args.data, args.out, n_px=args.n_px, tokenizer=tokenizer, shards=args.shards,
                   val_fraction=args.val_fraction, seed=args.seed, resize=args.resize, on_error=args.on_error,
                   overwrite=args.overwrite, any_palette=args.any_palette, upscale=args.upscale)
    if args.shards:
        splits = ", ".join(f"{k} {v['n']} in {len(v['shards'])} shards" for k, v in meta["splits"].items())
        stored = "original files" if meta["n_px"] is None else f"PNG at {args.n_px}x{args.n_px}"
        print(f"wrote {stored} ({splits}) -> {args.out}")
    else:
        splits = ", ".join(f"{k} {v['n']}" for k, v in meta["splits"].items())
        grid = meta.get("grid", args.n_px)
        ids = f", ids on a {grid}x{grid} grid" if meta["kind"] == "ids" and grid != args.n_px else ""
        print(f"prepared {meta['kind']} at {args.n_px}x{args.n_px}{ids} ({splits}) -> {args.out}")
