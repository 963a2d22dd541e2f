"""Tokenizer commands: ``igpt tokenizer fit`` (a VQ-VAE or a palette; ``--resume``) and ``igpt tokenizer
report`` (reconstruction error and code usage beside a palette at the same tokens per image)."""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import add_data, add_fields, add_overwrite, add_renamed, build, command, integer
from igpt.config.tokenizer import TokenizerFitConfig, VQConfig
from igpt.eval.tokens import report_tokenizer
from igpt.train.tokenizer import fit_tokenizer, resume_fit


def cmd_fit(args: argparse.Namespace) -> None:
    if args.resume:
        given = args.given - {"resume", "command", "tokenizer_command", "quiet", "given"}
        result = resume_fit(args.resume, changes={name: getattr(args, name) for name in given})
    else:
        missing = [f"--{n}" for n in ("data", "out") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"tokenizer fit needs {', '.join(missing)} (or --resume DIR)")
        result = fit_tokenizer(args.data, args.out, build(VQConfig, args), build(TokenizerFitConfig, args))
    val = result.get("val")
    quality = f"; val PSNR {val['psnr']:.2f} dB, perplexity {val['perplexity']:.1f}, {val['dead_codes']} dead codes" \
        if val else ""
    print(f"tokenizer {result['fingerprint']}{quality} -> {result['tokenizer']}")


def cmd_report(args: argparse.Namespace) -> None:
    r = report_tokenizer(args.tokenizer, args.data, args.out, split=args.split, palette=args.compare_palette,
                         palette_k=args.vocab_size, max_images=args.max_images, seed=args.seed, resize=args.resize,
                         device=args.device, overwrite=args.overwrite)
    v, p = r["vqvae"], r["palette"]
    print(f"{r['images']} {r['split']} images, {r['tokens_per_image']} tokens each: VQ-VAE PSNR {v['psnr']:.2f} dB "
          f"(MSE {v['mse']:.1f}, perplexity {v['perplexity']:.1f}, {v['dead_codes']} dead codes); palette "
          f"PSNR {p['psnr']:.2f} dB (MSE {p['mse']:.1f}, perplexity {p['perplexity']:.1f}) -> {args.out}")


def _fit_parser(sub: Any) -> None:
    fit = command(sub, "fit", help="fit a VQ-VAE (or a palette) on the training images of --data; --out DIR "
                  "then holds tokenizer.safetensors (or palette.npz), the file every --tokenizer takes")
    add_data(fit, required=False)
    fit.add_argument("--out", default=None, help="fit directory (fit.json, metrics.jsonl, checkpoint/, the "
                     "tokenizer file)")
    fit.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the VQ-VAE fit in DIR from its checkpoint (--steps may be raised)")
    add_fields(fit, TokenizerFitConfig, title="fit")
    add_fields(fit, VQConfig, title="VQ-VAE shape (--vocab-size and --input-side also size a palette fit)")
    fit.set_defaults(func=cmd_fit)


def _report_parser(sub: Any) -> None:
    rep = command(sub, "report", help="MSE, PSNR and code usage of a VQ-VAE tokenizer on a test split, beside "
                  "a palette at the same number of tokens per image; metrics.json and reconstructions.png")
    add_renamed(rep, "--tokenizer", "--palette", required=True, metavar="FILE",
                help="the VQ-VAE tokenizer file (tokenizer.safetensors from 'igpt tokenizer fit')")
    add_data(rep)
    rep.add_argument("--out", required=True, help="report directory")
    rep.add_argument("--split", default=None, help="split to score (default: test, else val)")
    rep.add_argument("--compare-palette", default=None, metavar="FILE",
                     help="the palette to compare with (default: fit one on the train split at the grid side)")
    add_fields(rep, TokenizerFitConfig, title="data", only=("resize", "seed", "device"))
    add_renamed(rep, "--vocab-size", "--palette-k", type=integer, default=512,
                help="colours of the palette fitted here to compare with (default: 512)")
    rep.add_argument("--max-images", type=integer, default=0, help="score at most this many images (default: 0, all)")
    add_overwrite(rep)
    rep.set_defaults(func=cmd_report)


def register(sub: Any) -> None:
    p = command(sub, "tokenizer", help="fit and report tokenizers (a VQ-VAE or a palette)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, help="tokenizer action")
    _fit_parser(tsub)
    _report_parser(tsub)
