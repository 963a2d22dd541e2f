"""The flags of ``igpt tokenizer fit`` and ``igpt tokenizer report`` (handlers: ``igpt.cli.tokenizer``)."""

from __future__ import annotations

from typing import Any

from igpt.cli.args import add_data, add_fields, add_overwrite, add_renamed, command, integer
from igpt.config.tokenizer import TokenizerFitConfig, VQConfig


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
    fit.set_defaults(handler="igpt.cli.tokenizer:cmd_fit")


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
    rep.set_defaults(handler="igpt.cli.tokenizer:cmd_report")


def register(sub: Any) -> None:
    p = command(sub, "tokenizer", help="fit and report tokenizers (a VQ-VAE or a palette)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, help="tokenizer action")
    _fit_parser(tsub)
    _report_parser(tsub)
