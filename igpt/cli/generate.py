"""Generation commands: ``sample`` (unconditional images), ``complete`` (the paper's half-image completions;
iterative infilling for BERT checkpoints) and ``score`` (the validation loss: mean NLL of a split).

    igpt sample --checkpoint runs/c10 --n 64 --out samples/          # 64 PNGs + grid.png
    igpt complete --checkpoint runs/c10 --images cat.jpg --out fig/   # original | top half | 4 completions
    igpt score --checkpoint runs/c10 --data ../shared/data/cifar10.npz  # nats and bits per token on test
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.cli.args import add_fields, build
from igpt.generate.sample import SampleConfig


def _setup(checkpoint: str, device_name: str, dtype_name: str) -> tuple[Any, Any, dict, torch.device, torch.dtype]:
    from igpt.weights.checkpoint import load_checkpoint
    from igpt.runtime import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    model, palette, info = load_checkpoint(checkpoint, device)
    return model, palette, info, device, resolve_dtype(dtype_name, device)


def _objective(info: dict, flag: str) -> str:
    """The checkpoint's pretraining objective; checkpoints that do not record one (converted ones) are AR."""
    return info.get("objective", "ar") if flag == "auto" else flag


def _open_eval_split(args: argparse.Namespace, n_px: int):
    """--split, or 'test' when the data has one and 'val' otherwise. Returns (ImageSet, split name)."""
    from igpt.data.cache import open_split

    kw = dict(n_px=n_px, val_fraction=args.val_fraction, seed=args.split_seed, resize=args.resize)
    if args.split:
        return open_split(args.data, args.split, **kw), args.split
    try:
        return open_split(args.data, "test", **kw), "test"
    except ValueError as e:
        if "has no 'test' split" not in str(e):
            raise
    return open_split(args.data, "val", **kw), "val"


def _checked(data, palette) -> None:
    """The data's ids must come from the checkpoint's palette (pixels are quantized with it here)."""
    from igpt.data.cache import check_palette

    check_palette(data, palette)
    if data.ids is not None and len(data) and int(data.ids.max()) >= palette.k:
        raise ValueError(f"--data {data.source}: holds ids up to {int(data.ids.max())}, but the checkpoint's "
                         f"palette has {palette.k} colours")


def cmd_sample(args: argparse.Namespace) -> None:
    from PIL import Image

    from igpt.generate.sample import make_generator, sample
    from igpt.viz import grid, save_png

    cfg = build(SampleConfig, args)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, palette, info, device, dtype = _setup(args.checkpoint, cfg.device, cfg.dtype)
    if _objective(info, args.objective) == "bert":
        raise ValueError(f"--checkpoint {args.checkpoint} is a BERT model, which cannot sample left to right; "
                         f"use 'igpt complete' to fill a masked region (with --keep 0: a blank canvas)")
    ids = sample(model, args.n, generator=make_generator(cfg.seed, device), dtype=dtype,
                 batch_size=cfg.batch_size, window=cfg.window, cuda_graph=cfg.cuda_graph and device.type == "cuda",
                 compile=cfg.compile, progress=True, **cfg.filters())
    n_px = model.config.n_px
    pixels = palette.decode(ids.cpu()).view(args.n, n_px, n_px, 3).numpy()  # (n, n_px, n_px, 3) uint8
    out = Path(args.out)
    for i, img in enumerate(pixels):
        save_png(Image.fromarray(img), out / f"sample-{i:04d}.png")
    save_png(grid(pixels, ncol=args.ncol, scale=args.scale), out / "grid.png")
    print(f"{args.n} samples at {n_px}x{n_px} -> {out}/sample-*.png and {out}/grid.png")


def _kept_rows(args: argparse.Namespace, n_px: int) -> int:
    if args.rows is not None:
        if not 0 <= args.rows <= n_px:
            raise ValueError(f"--rows must be in 0..{n_px} (the model's n_px), got {args.rows}")
        return args.rows
    if not 0.0 <= args.keep <= 1.0:
        raise ValueError(f"--keep must be a fraction in [0, 1], got {args.keep}")
    return min(n_px, max(0, round(args.keep * n_px)))


def _inputs(args: argparse.Namespace, palette, n_px: int) -> tuple[list[str], torch.Tensor, str]:
    """(names, ids (M, T) int64 on the CPU, where from) of the images to complete."""
    from igpt.data.streams import to_ids
    from igpt.data.images import load_image

    if args.images:
        pixels = np.stack([load_image(p, n_px, args.resize) for p in args.images])  # (M, n_px, n_px, 3)
        names = [f"{i:03d}-{Path(p).stem}" for i, p in enumerate(args.images)]
        return names, palette.encode(pixels).view(len(pixels), -1), f"{len(pixels)} image file(s)"
    data, split = _open_eval_split(args, n_px)
    _checked(data, palette)
    if args.n_images < 1 or not 0 <= args.offset < len(data):
        raise ValueError(f"--offset {args.offset} / --n-images {args.n_images}: the {split} split of "
                         f"{args.data} has {len(data)} images")
    index = np.arange(args.offset, min(len(data), args.offset + args.n_images))
    names = [f"{split}-{i:05d}" for i in index]
    return names, to_ids(data, index, palette, torch.device("cpu")), f"{args.data} ({split} split)"


def cmd_complete(args: argparse.Namespace) -> None:
    from igpt.generate.infill import infill
    from igpt.generate.sample import make_generator, sample
    from igpt.viz import completion_figure, hide_rows, save_png

    if bool(args.images) == bool(args.data):
        raise ValueError("complete needs exactly one of --images FILE... and --data DATA")
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {args.n_samples}")
    cfg = build(SampleConfig, args)
    model, palette, info, device, dtype = _setup(args.checkpoint, cfg.device, cfg.dtype)
    n_px, T = model.config.n_px, model.config.n_ctx
    rows = _kept_rows(args, n_px)
    names, ids, where = _inputs(args, palette, n_px)
    M, N = len(ids), args.n_samples
    known = ids.repeat_interleave(N, dim=0)  # (M * N, T): N copies of each input, adjacent
    generator = make_generator(cfg.seed, device)
    objective = _objective(info, args.objective)
    if objective == "ar":
        out = sample(model, M * N, prefix=known[:, :rows * n_px], generator=generator, dtype=dtype,
                     batch_size=cfg.batch_size, window=cfg.window, compile=cfg.compile, progress=True,
                     cuda_graph=cfg.cuda_graph and device.type == "cuda", **cfg.filters())
    else:
        keep = torch.zeros(M * N, T, dtype=torch.bool)
        keep[:, :rows * n_px] = True
        out = infill(model, known, keep, rounds=args.rounds, schedule=args.schedule, generator=generator,
                     dtype=dtype, batch_size=cfg.batch_size, **cfg.filters())
    originals = palette.decode(ids).view(M, n_px, n_px, 3).numpy()
    completions = palette.decode(out.cpu()).view(M, N, n_px, n_px, 3).numpy()
    kept = hide_rows(originals, rows)
    dest = Path(args.out)
    for i, name in enumerate(names):
        save_png(completion_figure(originals[i:i + 1], kept[i:i + 1], completions[i:i + 1], scale=args.scale),
                 dest / f"complete-{name}.png")
    save_png(completion_figure(originals, kept, completions, scale=args.scale), dest / "completions.png")
    how = "sampled" if objective == "ar" else f"infilled by BERT in {args.rounds} rounds ({args.schedule})"
    print(f"{M} input(s) from {where}: kept {rows} of {n_px} rows, {N} completion(s) each {how} -> "
          f"{dest}/completions.png and {M} complete-*.png")


def cmd_score(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from igpt.weights.checkpoint import write_json_atomic
    from igpt.data.streams import fixed_batches
    from igpt.train.pretrain import evaluate

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, palette, info, device, dtype = _setup(args.checkpoint, args.device, args.dtype)
    objective = _objective(info, args.objective)
    data, split = _open_eval_split(args, model.config.n_px)
    _checked(data, palette)
    batches = fixed_batches(data, args.batch_size, 0, palette, device)
    batches = tqdm(batches, total=math.ceil(len(data) / args.batch_size), desc="score", unit="batch")
    result = evaluate(model, batches, objective, args.mask_prob, args.seed, dtype)
    report = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": split, "objective": objective,
              "images": result["images"], "tokens_per_image": model.config.n_ctx,
              "nats_per_token": result["loss"], "bits_per_token": result["bits"]}
    head = f"{objective.upper()} score of {args.checkpoint} on {args.data} ({split}, {result['images']} images)"
    if objective == "ar":
        report["bits_per_subpixel_equivalent"] = result["bits"] / 3
        report["note"] = ("palette NLL over all tokens, pixel 0 included (predicted from the SOS); bits/3 is "
                          "not 8-bit bits/dim (no dequantization term)")
        print(f"{head}:\n  {result['loss']:.4f} nats/token  {result['bits']:.4f} bits/token  "
              f"{result['bits'] / 3:.4f} bits per sub-pixel-equivalent (bits/3; not 8-bit bits/dim)")
    else:
        report.update(mask_prob=args.mask_prob, seed=args.seed,
                      note="BERT: mean loss over the masked positions only, masks drawn from the seed")
        print(f"{head}:\n  masked-pixel loss {result['loss']:.4f} nats/token  {result['bits']:.4f} bits/token "
              f"(mask_prob {args.mask_prob}, seed {args.seed})")
    for path in ([Path(args.json)] if args.json else []) + ([Path(args.out) / "score.json"] if args.out else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, report)
        print(f"-> {path}")


# --------------------------------------------------------------------------------------------- parsers


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--objective", default="auto", choices=("auto", "ar", "bert"),
                   help="treat the model as AR or BERT; auto = what the checkpoint records (default: auto)")


def _data_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, default=None, help="dataset (any format 'igpt prepare' reads, "
                   "or a prepared cache); an ids cache must come from the checkpoint's palette")
    p.add_argument("--split", default=None, help="split to use (default: test when present, else val)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="val carved from train when the source has none; match the run's (default: 0.1)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of that carve; match the run's --seed (default: 0)")
    p.add_argument("--resize", default="center", choices=("center", "squash"),
                   help="how images reach the model's n_px (default: center)")


def _sample_parser(sub: Any) -> None:
    p = sub.add_parser("sample", help="unconditional samples of an AR checkpoint: PNGs plus a grid")
    _common(p)
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--out", required=True, help="output directory (sample-NNNN.png, grid.png)")
    p.add_argument("--ncol", type=int, default=8, help="images per row of grid.png (default: 8)")
    p.add_argument("--scale", type=int, default=4, help="enlargement of grid.png (default: 4)")
    add_fields(p, SampleConfig, title="sampling")
    p.set_defaults(func=cmd_sample)


def _complete_parser(sub: Any) -> None:
    p = sub.add_parser("complete", help="complete the bottom of real images (AR: sampling; BERT: iterative "
                       "infilling); writes the paper's figure")
    _common(p)
    p.add_argument("--images", nargs="+", default=None, metavar="FILE", help="image files to complete")
    _data_flags(p, required=False)
    p.add_argument("--n-images", type=int, default=8, help="with --data: how many images (default: 8)")
    p.add_argument("--offset", type=int, default=0, help="with --data: index of the first image (default: 0)")
    p.add_argument("--keep", type=float, default=0.5,
                   help="fraction of the rows kept from the top, rounded to whole rows (default: 0.5)")
    p.add_argument("--rows", type=int, default=None, help="rows kept from the top (overrides --keep)")
    p.add_argument("--n-samples", type=int, default=4, help="completions per input (default: 4)")
    p.add_argument("--rounds", type=int, default=8, help="BERT: rounds of iterative infilling (default: 8)")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "linear"),
                   help="BERT: how the masked count shrinks over the rounds (default: cosine)")
    p.add_argument("--out", required=True, help="output directory (completions.png, complete-*.png)")
    p.add_argument("--scale", type=int, default=4, help="enlargement of the figures (default: 4)")
    add_fields(p, SampleConfig, title="sampling")
    p.set_defaults(func=cmd_complete)


def _score_parser(sub: Any) -> None:
    p = sub.add_parser("score", help="mean negative log-likelihood of a split (nats and bits per token)")
    _common(p)
    _data_flags(p, required=True)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast dtype: auto = bf16 on GPUs that have it, else fp32 (default: auto)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="BERT: fraction of positions masked (default: 0.15)")
    p.add_argument("--seed", type=int, default=0, help="BERT: seed of the masks (default: 0)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--out", default=None, help="also write the result to OUT/score.json")
    p.set_defaults(func=cmd_score)


def register(sub: Any) -> None:
    for add in (_sample_parser, _complete_parser, _score_parser):
        add(sub)
