"""Pretraining objectives (paper section 2.2): autoregressive next-pixel and BERT-style masked pixels.

Both return the mean cross-entropy in nats per token, computed in fp32 whatever the autocast dtype.
``mean_loss`` scores a model over batches with the loss its ``igpt.record.Reading`` names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igpt.runtime import autocast, derived_generator

LN2 = math.log(2.0)


def nats_to_bits(nats: float) -> float:
    return nats / LN2


def ar_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every pixel given the pixels before it, over all T positions (pixel 0 is
    predicted from the SOS vector alone), averaged over the batch."""
    logits = model(ids, causal=True)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())


def sample_keep_mask(shape: tuple[int, int], mask_prob: float, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (B, T), False where a position is masked. As in image-gpt, each position is masked
    independently with probability ``mask_prob`` (keep = uniform > p). Drawn on the CPU with ``generator``
    and then moved, so a seeded run masks the same positions on every device."""
    u = torch.rand(shape, generator=generator)
    return (u > mask_prob).to(device) if device is not None else u > mask_prob


def masked_loss(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-example mean cross-entropy over the masked positions, then the mean over examples.

    image-gpt divides by each example's masked count; an example with no masked position (possible at tiny
    T) would divide 0 by 0 there, so it is left out of the mean instead.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, T)
    masked = (~keep).float()
    count = masked.sum(dim=1)  # (B,)
    per_example = (ce * masked).sum(dim=1) / count.clamp_min(1.0)
    has_mask = (count > 0).float()
    return (per_example * has_mask).sum() / has_mask.sum().clamp_min(1.0)


def bert_loss(model: nn.Module, ids: torch.Tensor, mask_prob: float = 0.15,
              generator: torch.Generator | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """BERT objective: masked positions get a zero content embedding (no MASK id), attention is
    bidirectional, and the loss covers the masked positions only. A fresh mask is drawn per call unless
    ``keep`` is given."""
    if keep is None:
        keep = sample_keep_mask(tuple(ids.shape), mask_prob, generator, ids.device)
    logits = model(ids, causal=False, keep=keep)  # (B, T, V)
    return masked_loss(logits, ids, keep)


EVAL_MASK_KEY = 1 << 30  # derived-generator key of evaluation masks, apart from any training step


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[torch.Tensor], objective: str = "ar", mask_prob: float = 0.15,
              seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean ``objective`` loss over ``batches`` of ids (B, T) (weighted by images), in nats and bits per
    token. BERT masks come from fixed seeds (``seed``, the batch index), so repeated evaluations of one model
    agree."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, ids in enumerate(batches):
        with autocast(ids.device, dtype):
            if objective == "ar":
                loss = ar_loss(model, ids)
            else:
                generator = derived_generator(seed, EVAL_MASK_KEY, i)
                loss = bert_loss(model, ids, keep=sample_keep_mask(tuple(ids.shape), mask_prob, generator, ids.device))
        total, count = total + loss.item() * len(ids), count + len(ids)
    model.train(was_training)
    if count == 0:
        raise ValueError("mean_loss: no batches")
    return {"loss": total / count, "bits": nats_to_bits(total / count), "images": count}


def modal_vote(preds: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """The most frequent class of each column of ``preds`` (K, N) (K predictions of N images, e.g. under K
    BERT masks: the paper's ensemble), ties broken uniformly at random by a generator seeded with ``seed``."""
    preds = np.asarray(preds)
    counts = np.zeros((preds.shape[1], n_classes))  # (N, C)
    for row in preds:
        counts[np.arange(preds.shape[1]), row] += 1
    jitter = np.random.default_rng(seed).random(counts.shape) * 0.5  # < 1: only breaks ties
    return (counts + jitter).argmax(1)
