"""Foundation commands: ``palette fit``, ``prepare``, ``pretrain`` and ``demo``."""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import add_fields, build
from igpt.config import PRESETS, DataConfig, ModelConfig, TrainConfig


def cmd_palette_fit(args: argparse.Namespace) -> None:
    from igpt.data.cache import open_split
    from igpt.palette import Palette

    images = open_split(args.data, "train", n_px=args.n_px, val_fraction=0.0, resize=args.resize)
    if images.pixels is None:
        raise ValueError(f"--data {args.data} holds palette ids, not pixels: there is nothing to fit")
    palette = Palette.fit(images.pixels, k=args.k, iters=args.iters, seed=args.seed, progress=True)
    palette.save(args.out)
    meta = palette.meta
    print(f"palette {palette.fingerprint()}: {palette.k} colours from {meta.get('n_pixels', '?')} pixels, "
          f"RMSE {meta.get('mse_uint8', float('nan')) ** 0.5:.2f} (0..255 scale) -> {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from igpt.data.cache import prepare
    from igpt.palette import Palette

    if args.shards:
        _prepare_shards(args)
        return
    palette = Palette.load(args.palette) if args.palette else None
    meta = prepare(args.data, args.out, n_px=args.n_px, palette=palette, val_fraction=args.val_fraction,
                   seed=args.seed, resize=args.resize, on_error=args.on_error)
    splits = ", ".join(f"{k} {v['n']}" for k, v in meta["splits"].items())
    print(f"prepared {meta['kind']} at {args.n_px}x{args.n_px} ({splits}) -> {args.out}")


def _prepare_shards(args: argparse.Namespace) -> None:
    from igpt.data.shard_writer import write_shards

    if args.palette:
        raise ValueError("--shards stores images, not palette ids: leave out --palette (training quantizes)")
    meta = write_shards(args.data, args.out, n_px=args.n_px, per_shard=args.shards, val_fraction=args.val_fraction,
                        seed=args.seed, resize=args.resize, on_error=args.on_error)
    splits = ", ".join(f"{k} {v['n']} in {len(v['shards'])} shards" for k, v in meta["splits"].items())
    stored = "original files" if meta["n_px"] is None else f"PNG at {args.n_px}x{args.n_px}"
    print(f"wrote {stored} ({splits}) -> {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from igpt.train.pretrain import pretrain

    if args.resume:
        result = pretrain(None, None, None, args.resume, resume=True)
    else:
        if args.out is None:
            raise ValueError("pretrain needs --out RUN_DIR (or --resume RUN_DIR)")
        model_cfg = build(ModelConfig, args, PRESETS[args.preset])
        result = pretrain(model_cfg, build(TrainConfig, args), build(DataConfig, args), args.out)
    val = result.get("val")
    val_text = f", val {val['loss']:.4f} nats/token ({val['bits']:.4f} bits)" if val else ""
    print(f"train loss {result['train']['loss']:.4f} nats/token{val_text}; checkpoint {result['checkpoint']}")


def cmd_demo(args: argparse.Namespace) -> None:
    from igpt.demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed)


def _palette_parser(sub: Any) -> None:
    p = sub.add_parser("palette", help="fit a k-means colour palette")
    psub = p.add_subparsers(dest="palette_command", required=True, help="palette action")
    fit = psub.add_parser("fit", help="fit a palette on the training pixels of --data")
    fit.add_argument("--data", required=True, help="dataset (any format 'igpt prepare' accepts)")
    fit.add_argument("--out", required=True, help="output: .npy (OpenAI's kmeans_centers layout) or .npz")
    fit.add_argument("--k", type=int, default=512, help="number of colours (default: 512)")
    fit.add_argument("--iters", type=int, default=30, help="maximum Lloyd iterations (default: 30)")
    fit.add_argument("--seed", type=int, default=0, help="seed for initialisation (default: 0)")
    fit.add_argument("--n-px", type=int, default=32, help="downscale images to this side first (default: 32)")
    fit.add_argument("--resize", default="center", choices=("center", "squash"), help="resize mode")
    fit.set_defaults(func=cmd_palette_fit)


def _prepare_parser(sub: Any) -> None:
    p = sub.add_parser("prepare", help="convert a dataset into a memory-mapped cache of pixels or ids")
    p.add_argument("--data", required=True, help="source dataset")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--n-px", type=int, required=True, help="image side after downscaling")
    p.add_argument("--palette", default=None, help="palette file: store ids instead of pixels")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation carved from train (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation carve (default: 0)")
    p.add_argument("--resize", default="center", choices=("center", "squash"), help="resize mode")
    p.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                   help="an unreadable image stops the run, or is skipped and counted (default: stop)")
    p.add_argument("--shards", type=int, default=0, metavar="N_PER_SHARD",
                   help="write WebDataset tar shards of N images each (+ index, shards.json) for streaming "
                        "instead of a memory-mapped cache; image folders keep their original files "
                        "(default: 0, the cache)")
    p.set_defaults(func=cmd_prepare)


def _pretrain_parser(sub: Any) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (AR or BERT)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="igpt-s", choices=sorted(PRESETS), help="model shape")
    p.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl, palette)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest checkpoint with its saved configs")
    add_fields(p, ModelConfig, title="model (overrides the preset)", preset_fields=True)
    add_fields(p, TrainConfig, title="training")
    add_fields(p, DataConfig, title="data")
    p.set_defaults(func=cmd_pretrain)


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="palette -> prepare -> pretrain -> probe -> samples on scikit-learn digits")
    p.add_argument("--out", default="igpt-demo", help="output directory (default: igpt-demo)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.set_defaults(func=cmd_demo)




def register(sub: Any) -> None:
    for add in (_palette_parser, _prepare_parser, _pretrain_parser, _demo_parser):
        add(sub)
