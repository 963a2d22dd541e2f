"""``igpt score``: the mean negative log-likelihood of a split, the paper's validation loss.

A checkpoint is scored with the loss its record names (``igpt.record``): an AR model by the next-pixel
cross-entropy over all T pixels (pixel 0 predicted from the SOS), a BERT model (fine-tuned or not) by the
loss on masked positions, with masks drawn from ``seed`` at the rate it was trained with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from igpt.config import EvalDataConfig, ScoreConfig
from igpt.data.open import open_eval
from igpt.data.streams import fixed_batches
from igpt.objectives import mean_loss
from igpt.runtime import resolve_device, resolve_dtype
from igpt.weights.convert import load


def score(checkpoint: str | Path, data: EvalDataConfig, cfg: ScoreConfig = ScoreConfig(), *,
          progress: bool = True) -> dict[str, Any]:
    """{"checkpoint", "data", "split", "objective", "images", "tokens_per_image", "nats_per_token",
    "bits_per_token", ...} of ``checkpoint`` on a split of ``data.data``."""
    if not data.data:
        raise ValueError("score needs --data")
    device = resolve_device(cfg.device)
    model, tokenizer, record = load(checkpoint, device)
    reading = record.reading
    mask_prob = reading.mask_prob if cfg.mask_prob == -1 else cfg.mask_prob
    images, split = open_eval(data.data, data.split, n_px=tokenizer.pixel_side(model.config.n_px), tokenizer=tokenizer,
                              val_fraction=data.val_fraction, seed=data.split_seed, resize=data.resize,
                              any_palette=data.any_palette)
    batches = fixed_batches(images, cfg.batch_size, 0, tokenizer, device)
    batches = tqdm(batches, total=math.ceil(len(images) / cfg.batch_size), desc="score", unit="batch",
                   disable=not progress)
    result = mean_loss(model, batches, reading.objective, mask_prob, cfg.seed, resolve_dtype(cfg.dtype, device))
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "data": str(data.data), "split": split,
                              "objective": reading.objective, "images": result["images"],
                              "tokens_per_image": model.config.n_ctx, "nats_per_token": result["loss"],
                              "bits_per_token": result["bits"]}
    if reading.objective == "ar" and tokenizer.kind == "palette":
        report["bits_per_subpixel_equivalent"] = result["bits"] / 3
        report["note"] = ("palette NLL over all tokens, pixel 0 included (predicted from the SOS); bits/3 is "
                          "not 8-bit bits/dim (no dequantization term)")
    elif reading.objective == "ar":  # a code stands for a patch of pixels: there is no per-sub-pixel figure
        report["note"] = (f"NLL of VQ-VAE codes over all {model.config.n_ctx} tokens, code 0 included (predicted "
                          "from the SOS); bits per token, not per pixel: each code stands for a "
                          f"{tokenizer.pixel_side(model.config.n_px) // model.config.n_px}x"
                          f"{tokenizer.pixel_side(model.config.n_px) // model.config.n_px} patch")
    else:
        report.update(mask_prob=mask_prob, seed=cfg.seed,
                      note="BERT: mean loss over the masked positions only, masks drawn from the seed")
    return report
