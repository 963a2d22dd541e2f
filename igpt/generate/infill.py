"""Completing images with a BERT checkpoint by iterative masked prediction.

A BERT-objective model (``causal=False``) predicts masked pixels from every unmasked one at once, so it
cannot sample left to right; OpenAI's sampler ignores ``--bert`` (reference igpt.md section 3). ``infill``
fills a masked region instead, in the manner of MaskGIT (Chang et al., CVPR 2022):

1. Every still-masked position gets a zero content embedding (the ``keep`` input of ``GPT.forward``, as in
   pretraining), and the bidirectional model predicts all of them in one pass.
2. A candidate id is drawn at each masked position from its predicted distribution (temperature, top-k and
   top-p as in ``igpt.generate.sample``; temperature 0 takes the argmax); its confidence is the probability the
   (filtered) distribution gave to it.
3. The most confident candidates are fixed. How many stay masked after round r of R follows a schedule of
   the masked count M at the start: ``floor(M * cos(pi/2 * r/R))`` (cosine, MaskGIT's choice: few ids at
   first, when the context is thinnest) or ``floor(M * (1 - r/R))`` (linear). At least one position is
   fixed per round, and the last round fixes everything that is left.
4. Fixed ids become context (unmasked) for the next round; the other candidates are discarded.

Unmasked ids are never changed. The draws come from one seeded generator, so a run is reproducible for a
given seed, device and batch size. Unlike MaskGIT, no noise is added to the confidences. A BERT model
pretrained with 15% of positions masked has seen little context as thin as a half image, and none as thin
as a blank canvas, so completions of large regions are rougher than an AR model's.
"""

from __future__ import annotations

import math

import torch

from igpt.config import SCHEDULES
from igpt.model import GPT
from igpt.runtime import autocast
from igpt.generate.sample import draw_from, filter_logits


def still_masked(total: torch.Tensor, r: int, rounds: int, schedule: str) -> torch.Tensor:
    """How many of ``total`` (B,) masked positions remain masked after round ``r`` (1-based) of ``rounds``."""
    t = r / rounds
    if schedule == "cosine":
        frac = math.cos(math.pi / 2 * t)
    elif schedule == "linear":
        frac = 1.0 - t
    else:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    return torch.zeros_like(total) if r >= rounds else torch.floor(total.double() * frac).long()


def propose(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A candidate id and its confidence at every position: logits (B, T, V) -> ids (B, T), probs (B, T)."""
    if temperature == 0:
        conf, ids = logits.float().softmax(dim=-1).max(dim=-1)
        return ids, conf
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # (B, T, V)
    ids = draw_from(probs, generator)
    return ids, probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _infill_batch(model: GPT, ids: torch.Tensor, keep: torch.Tensor, rounds: int, schedule: str,
                  temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    out = ids.masked_fill(~keep, 0)  # masked inputs are zero-embedded anyway; 0 keeps them valid ids
    known = keep.clone()
    total = (~keep).sum(dim=1)  # (B,) masked at the start
    for r in range(1, rounds + 1):
        unknown = ~known
        left = unknown.sum(dim=1)  # (B,)
        if not bool(left.any()):
            break
        with autocast(ids.device, dtype):
            logits = model(out, causal=False, keep=known)  # (B, T, V)
        cand, conf = propose(logits, temperature, top_k, top_p, generator)
        n_fix = torch.maximum(left - still_masked(total, r, rounds, schedule), left.clamp(max=1))  # (B,)
        # rank the masked positions by confidence (known ones last) and fix the first n_fix of each row
        order = conf.masked_fill(known, float("-inf")).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order))
        fix = unknown & (rank < n_fix.unsqueeze(1))  # (B, T)
        out = torch.where(fix, cand, out)
        known = known | fix
    return out


@torch.no_grad()
def infill(model: GPT, ids: torch.Tensor, keep: torch.Tensor, *, rounds: int = 8, schedule: str = "cosine",
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
           batch_size: int | None = None) -> torch.Tensor:
    """Fill the positions where ``keep`` (n, T) bool is False; ids (n, T) elsewhere are returned unchanged.
    See the module docstring for the algorithm. ``batch_size`` images per forward pass (all by default)."""
    T = model.config.n_ctx
    if ids.dim() != 2 or ids.shape[1] != T or keep.shape != ids.shape or keep.dtype != torch.bool:
        raise ValueError(f"infill needs ids (n, {T}) and a bool keep mask of the same shape, got "
                         f"{tuple(ids.shape)} and {keep.dtype} {tuple(keep.shape)}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = model.wte.weight.device
    ids, keep = ids.to(device), keep.to(device)
    model.eval()
    batch_size = len(ids) if batch_size is None else batch_size
    parts = [_infill_batch(model, ids[s:s + batch_size], keep[s:s + batch_size], rounds, schedule,
                           temperature, top_k, top_p, generator, dtype)
             for s in range(0, len(ids), batch_size)]
    return torch.cat(parts) if parts else ids.clone()
