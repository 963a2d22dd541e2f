"""Tokenizer commands: ``igpt tokenizer fit`` (a VQ-VAE or a palette; ``--resume``) and ``igpt tokenizer
report`` (reconstruction error and code usage beside a palette at the same tokens per image)."""

from __future__ import annotations

import argparse

from igpt.cli.args import build
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
