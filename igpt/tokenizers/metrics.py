"""How well a tokenizer keeps the images: reconstruction error, PSNR and code usage."""

from __future__ import annotations

import math

import numpy as np
import torch

from igpt.tokenizers.files import AnyTokenizer


def usage(ids: torch.Tensor, k: int) -> tuple[float, int]:
    """(perplexity of the code histogram, codes never used) of ids (...) in [0, k)."""
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=k).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), int((counts == 0).sum())


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a per-value MSE in 0..255 units."""
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def reconstruction(tok: AnyTokenizer, pixels: np.ndarray, batch: int = 256) -> dict[str, float]:
    """MSE (0..255 units), PSNR (dB), code perplexity and dead codes of ``tok`` on uint8 images (N, S, S, 3)
    (S = ``tok.pixel_side`` of its grid): decode(encode(images)) against the images."""
    err, all_ids = 0.0, []
    for s in range(0, len(pixels), batch):
        px = torch.from_numpy(np.ascontiguousarray(pixels[s:s + batch]))
        ids = tok.encode(px)
        all_ids.append(ids)
        err += float((tok.decode_images(ids).double() - px.double()).pow(2).sum())
    mse = err / max(1, pixels.size)
    perplexity, dead = usage(torch.cat(all_ids), tok.k)
    return {"mse": mse, "psnr": psnr(mse), "perplexity": perplexity, "dead_codes": dead}
