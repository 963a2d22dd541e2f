"""Autoregressive sampling with a pre-allocated KV cache. Knows ids only; pixels go through the palette.

``sample(model, n)`` draws unconditional images; ``prefix`` (n, P) ids completes given first pixels (the
paper's half-image completions keep the top rows). Each new pixel costs one token's work: the SOS and the
prefix are fed in one pass, then one position per step.
"""

from __future__ import annotations

import torch

from igpt.model import GPT
from igpt.runtime import autocast


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale by 1/temperature, then set everything outside the top-k ids and outside the smallest set whose
    probability reaches top_p (nucleus) to -inf. (B, V) -> (B, V) float32."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id when the ids ranked above it already reach top_p; the top id always survives
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
         generator: torch.Generator | None) -> torch.Tensor:
    """One id per row (B,) from logits (B, V); temperature 0 is the greedy argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check(model: GPT, n: int, prefix: torch.Tensor | None, temperature: float) -> None:
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if prefix is not None and (prefix.dim() != 2 or prefix.shape[0] != n or prefix.shape[1] > model.config.n_ctx):
        raise ValueError(f"prefix must be ({n}, P<={model.config.n_ctx}) ids, got {tuple(prefix.shape)}")


@torch.no_grad()
def sample(model: GPT, n: int, *, prefix: torch.Tensor | None = None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample ids (n, T) with a KV cache, keeping ``prefix`` (n, P) as the first P pixels."""
    _check(model, n, prefix, temperature)
    device, T = model.wte.weight.device, model.config.n_ctx
    out = torch.empty(n, T, dtype=torch.long, device=device)
    known = prefix.to(device) if prefix is not None else out[:, :0]
    out[:, :known.shape[1]] = known
    if known.shape[1] == T:
        return out
    model.eval()
    with autocast(device, dtype):
        cache = model.new_cache(n, device, dtype)
        logits = model.decode_step(known, cache)  # SOS + prefix in one pass -> logits of pixel P
        for i in range(known.shape[1], T):
            out[:, i] = draw(logits, temperature, top_k, top_p, generator)
            if i + 1 < T:
                logits = model.decode_step(out[:, i:i + 1], cache)
    return out


@torch.no_grad()
def sample_uncached(model: GPT, n: int, *, prefix: torch.Tensor | None = None, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference sampler of image-gpt's run.py: a full forward pass per pixel. Slow; for tests."""
    _check(model, n, prefix, temperature)
    device, T = model.wte.weight.device, model.config.n_ctx
    out = torch.zeros(n, T, dtype=torch.long, device=device)
    P = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        out[:, :P] = prefix.to(device)
    model.eval()
    for i in range(P, T):
        logits = model(out[:, :i + 1])[:, i]  # position i sees only out[:, :i] through the SOS shift
        out[:, i] = draw(logits, temperature, top_k, top_p, generator)
    return out
