"""Data commands: ``igpt palette fit`` and ``igpt prepare``."""

from __future__ import annotations

import argparse
from typing import Any

from igpt.atomic import check_output
from igpt.cli.args import add_data, add_fields, add_overwrite, add_renamed, add_resize, command, integer
from igpt.config import DataConfig, EvalDataConfig
from igpt.data.open import open_split, prepare
from igpt.config.tokenizer import TokenizerFitConfig
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


def _palette_parser(sub: Any) -> None:
    p = command(sub, "palette", help="fit a k-means colour palette")
    psub = p.add_subparsers(dest="palette_command", required=True, help="palette action")
    fit = command(psub, "fit", help="fit a palette on the training pixels of --data")
    add_data(fit)
    fit.add_argument("--out", required=True, help="output: .npy (OpenAI's kmeans_centers layout) or .npz")
    add_fields(fit, DataConfig, title="palette", only=("vocab_size",))
    fit.add_argument("--iters", type=integer, default=30, help="maximum Lloyd iterations (default: 30)")
    fit.add_argument("--seed", type=integer, default=0, help="seed of the k-means++ initialisation (default: 0)")
    fit.add_argument("--n-px", type=integer, default=32, help="downscale images to this side first (default: 32)")
    add_resize(fit)
    add_overwrite(fit)
    fit.set_defaults(func=cmd_palette_fit)


def _prepare_parser(sub: Any) -> None:
    p = command(sub, "prepare", help="convert a dataset into a memory-mapped cache of pixels or ids, or into "
                "tar shards")
    add_data(p)
    p.add_argument("--out", required=True, help="cache (or shards) directory to write")
    p.add_argument("--n-px", type=integer, required=True,
                   help="image side after resizing (the input resolution): with a palette also the side of the "
                        "id grid; a VQ-VAE tokenizer needs its own input side and makes a smaller grid")
    add_renamed(p, "--tokenizer", "--palette", default=None, metavar="FILE",
                help="tokenizer file, a palette (.npz, .npy) or a VQ-VAE (.safetensors from 'igpt tokenizer "
                     "fit'): store its ids instead of pixels (default: none)")
    add_fields(p, TokenizerFitConfig, title="images", only=("upscale",))
    add_fields(p, DataConfig, title="data", only=("val_fraction", "resize"))
    add_fields(p, EvalDataConfig, title="tokenizer check", only=("any_palette",))
    p.add_argument("--seed", type=integer, default=0, help="seed of the validation carve (default: 0)")
    p.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                   help="an unreadable image stops the run, or is skipped and counted (default: stop)")
    p.add_argument("--shards", type=integer, default=0, metavar="N_PER_SHARD",
                   help="write WebDataset tar shards of N images each (+ index, shards.json) for streaming "
                        "instead of a memory-mapped cache; image folders keep their original files "
                        "(default: 0, the cache)")
    add_overwrite(p)
    p.set_defaults(func=cmd_prepare)


def register(sub: Any) -> None:
    _palette_parser(sub)
    _prepare_parser(sub)
