"""``igpt classify``: the top classes of a fine-tuned checkpoint for image files or PIL images.

The images are resized exactly as the fine-tune resized its data (the ``resize`` recorded in the run's
finetune.json, ``igpt.weights.card.run_facts``; ``center`` when the checkpoint stands alone), quantized
with the checkpoint's tokenizer, and read as the head was trained: the mean over positions of the normed
features of the layer the checkpoint records (the final norm unless it was fine-tuned with --head-layer), a
bias-free linear map, softmax. A BERT trunk reads them masked, as it was trained and as the fine-tune
evaluated it (the paper: "at evaluation the BERT model's inputs must also be masked"): at the rate the
checkpoint records, under ``n_masks`` seeded masks whose class probabilities are averaged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from igpt.config import ClassifyConfig
from igpt.data.images import ImageLike, encode_images
from igpt.objectives import EVAL_MASK_KEY, sample_keep_mask
from igpt.runtime import derived_generator, resolve_device
from igpt.weights.card import run_facts
from igpt.weights.convert import load_classifier, locate


class Prediction(NamedTuple):
    label: str
    prob: float


@torch.no_grad()
def classify(checkpoint: str | Path, images: ImageLike | Sequence[ImageLike],
             cfg: ClassifyConfig = ClassifyConfig(), resize: str | None = None) -> list[list[Prediction]]:
    """For each image, its ``cfg.top_k`` classes (most probable first) under the fine-tuned ``checkpoint``
    (a checkpoint, its fine-tune run directory or a Hub id). ``resize`` defaults to the fine-tune's."""
    top_k, device = cfg.top_k, resolve_device(cfg.device)
    one = isinstance(images, (str, os.PathLike))
    for item in [images] if one else images if isinstance(images, (list, tuple)) else []:
        if isinstance(item, (str, os.PathLike)) and not Path(item).is_file():
            raise FileNotFoundError(f"{item}: no such image file")  # before the checkpoint is read
    ckpt_dir = locate(checkpoint)
    model, head, tokenizer, record = load_classifier(ckpt_dir, device)
    resize = resize or run_facts(ckpt_dir).get("resize", "center")
    ids = encode_images(images, tokenizer, model.config.n_px, resize)  # (B, T)
    ids, layer, reading = ids.to(device), record.head_layer, record.reading
    probs = torch.zeros(len(ids), head.out_features, device=device)  # (B, n_classes)
    n_masks = 1 if reading.causal else cfg.n_masks
    for k in range(n_masks):
        keep = None if reading.causal else sample_keep_mask(
            tuple(ids.shape), reading.mask_prob, derived_generator(cfg.seed, EVAL_MASK_KEY, k), device)  # (B, T)
        feats = model.layer_features(ids, [layer], keep=keep)[layer]  # (B, D): mean over positions
        probs += head(feats).float().softmax(-1) / n_masks
    n = record.finetuned.n_classes  # type: ignore[union-attr]
    names = list(record.finetuned.classes or [f"class {i}" for i in range(n)])  # type: ignore[union-attr]
    top = probs.topk(min(top_k, n), dim=-1)
    return [[Prediction(names[int(i)], float(p)) for p, i in zip(ps, idx)]
            for ps, idx in zip(top.values.cpu(), top.indices.cpu())]
