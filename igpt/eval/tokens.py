"""``igpt tokenizer report``: what a VQ-VAE tokenizer keeps of an image, beside a palette at the same number of
tokens per image.

A VQ-VAE reads S x S images and makes a g x g grid of codes (g = S / factor). The palette that spends the
same g*g tokens on an image sees it at g x g pixels: each S x S test image is brought to g x g by the resize
every dataset gets (``to_n_px``), quantized to the palette, decoded and enlarged back to S x S (bicubic).
Both are scored against the S x S originals: MSE per channel value (0..255 units), PSNR, the perplexity of the ids'
histogram and the ids never used. ``reconstructions.png`` shows originals, the VQ-VAE and the palette in
three rows; ``metrics.json`` holds the numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import check_output, write_json
from igpt.data.images import to_n_px
from igpt.data.open import open_eval, open_split
from igpt.tokenizers import Palette, VQTokenizer, load_tokenizer, psnr, reconstruction, usage
from igpt.runtime import resolve_device
from igpt.viz import save_png, tile_table

log = logging.getLogger(__name__)
SHOWN = 8  # images in the figure


def palette_at_grid(palette: Palette, small: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, g, g), images enlarged to side x side (N, side, side, 3)) of g x g images through a palette."""
    ids = palette.encode(small)  # (N, g, g)
    decoded = palette.decode(ids).numpy()  # (N, g, g, 3)
    return ids.numpy(), np.stack([to_n_px(im, side) for im in decoded])


def report_tokenizer(tokenizer: str, data: str, out: str | Path, *, split: str | None = None,
                     palette: str | None = None, palette_k: int = 512, max_images: int = 0, seed: int = 0,
                     resize: str = "center", device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Write metrics.json and reconstructions.png in ``out`` for the VQ-VAE ``tokenizer`` on the test split
    of ``data`` (``split``, else test, else val), beside ``palette`` (fitted here on the train split at the
    grid side when not given). Returns the metrics."""
    out = Path(out)
    check_output(out, "--out", overwrite=overwrite)
    tok = load_tokenizer(tokenizer)
    if not isinstance(tok, VQTokenizer):
        raise ValueError(f"--tokenizer {tokenizer}: the report compares a VQ-VAE tokenizer (.safetensors, from 'igpt "
                         "tokenizer fit') with a palette; this file is a palette")
    tok.to(resolve_device(device))
    side, g = tok.input_side, tok.grid
    images, name = open_eval(data, split, n_px=side, tokenizer=tok, seed=seed, resize=resize)
    if images.pixels is None:
        raise ValueError(f"--data {data} holds ids, not images: a report reconstructs images")
    n = len(images) if max_images == 0 else min(len(images), max_images)
    originals = np.asarray(images.pixels[:n])  # (n, S, S, 3)
    small_px = np.stack([to_n_px(im, g) for im in originals])  # (n, g, g, 3): the same resize, S -> g
    pal = _palette(palette, data, side, g, palette_k, seed, resize, device)
    vq = reconstruction(tok, originals)
    pal_ids, pal_images = palette_at_grid(pal, small_px, side)
    pal_mse = float(((pal_images.astype(np.float64) - originals) ** 2).mean())
    perplexity, dead = usage(torch.from_numpy(pal_ids), pal.k)
    report = {"data": data, "split": name, "images": n, "input_side": side, "grid": g,
              "tokens_per_image": g * g,
              "vqvae": {"tokenizer": tokenizer, "fingerprint": tok.fingerprint(), "codes": tok.k, **vq},
              "palette": {"palette": palette or "fitted here on the train split", "fingerprint": pal.fingerprint(),
                          "colours": pal.k, "mse": pal_mse, "psnr": psnr(pal_mse), "perplexity": perplexity,
                          "dead_codes": dead}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", report)
    _figure(tok, originals[:SHOWN], pal_images[:SHOWN], report, out / "reconstructions.png")
    return report


def _palette(path: str | None, data: str, side: int, g: int, k: int, seed: int, resize: str,
             device: str) -> Palette:
    """The palette to compare with: the file given, or one fitted on the train split brought to g x g."""
    if path is not None:
        return Palette.load(path)
    train = open_split(data, "train", n_px=side, val_fraction=0.0, seed=seed, resize=resize)
    if train.pixels is None:
        raise ValueError(f"--data {data} holds ids: pass --compare-palette to compare with")
    log.info("fitting a %d-colour palette on %d training images at %dx%d", k, len(train), g, g)
    small = np.stack([to_n_px(im, g) for im in train.pixels])  # (N, g, g, 3)
    return Palette.fit(small, k=k, seed=seed, device=resolve_device(device))


def _figure(tok: VQTokenizer, originals: np.ndarray, pal_images: np.ndarray, report: dict[str, Any],
            path: Path) -> None:
    recon = tok.decode_images(tok.encode(originals)).numpy()
    side, g, v, p = report["input_side"], report["grid"], report["vqvae"], report["palette"]
    rows = [list(originals), list(recon), list(pal_images)]
    title = (f"rows: originals {side}x{side} · VQ-VAE, {g}x{g} codes, {v['psnr']:.1f} dB · palette at {g}x{g}, "
             f"{p['psnr']:.1f} dB ({g * g} tokens per image)")
    table = tile_table(rows, scale=max(1, 96 // side), title=title)
    save_png(table.image, path)
