"""Autoregressive sampling with a pre-allocated KV cache. Knows ids only; pixels go through the tokenizer.

``sample(model, n)`` draws unconditional images; ``prefix`` (n, P) ids completes given first pixels (the
paper's half-image completions keep the top rows). Each new pixel costs one token's work: the SOS and the
prefix are fed in one pass (``GPT.decode_step``), then one position per step (``GPT.decode_at``).

Speed (see ``igpt.bench.sample``): a step is bounded by reading the KV cache once, so the per-step work is kept
static and small. The one-token step has fixed shapes: the position lives in a device tensor and attention
covers the cache up to the next multiple of ``window`` slots, masking the slots past the position. On CUDA
the step is captured as one CUDA graph per width (n_ctx / window graphs) and replayed, so a 24-layer step
costs one launch instead of hundreds. Drawing happens outside the graph and never synchronises with the
host (the exponential race below instead of ``torch.multinomial``, whose argument check reads the device).

Precision: ``dtype=torch.bfloat16`` samples with a bf16 copy of the weights and a bf16 cache (what a GPU
wants); the cache then holds half the bytes per step. On the CPU the default is fp32, and sampling with a
KV cache equals a full forward pass per pixel (image-gpt's sampler, in tests/test_sample.py) token for token
with the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from igpt.model import GPT

def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device``: draws happen where the logits are, without a copy to the host."""
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale by 1/temperature, then set everything outside the top-k ids and outside the smallest set whose
    probability reaches top_p (nucleus) to -inf. (..., V) -> (..., V) float32."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id when the ids ranked above it already reach top_p; the top id always survives
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of probs (..., V): argmax(p / E) with E ~ Exp(1) i.i.d. picks id i with probability
    p_i (the exponential race; torch.multinomial does the same after a check that syncs with the host).
    An id of probability 0 can never win; E is kept above 0 so that no ratio is 0/0."""
    e = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / e).argmax(dim=-1)


def draw(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
         generator: torch.Generator | None) -> torch.Tensor:
    """One id per row (...,) from logits (..., V); temperature 0 is the greedy argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return draw_from(filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1), generator)


def check_can_sample(model: GPT) -> None:
    """Left-to-right sampling needs a causal (AR) model: a BERT model never learned p(pixel | pixels before)."""
    if not model.causal:
        raise ValueError("this is a BERT (bidirectional) model, which cannot be sampled left to right; fill a "
                         "masked region with igpt.generate.infill instead (igpt complete does)")


def _check(model: GPT, n: int, prefix: torch.Tensor | None, temperature: float) -> None:
    check_can_sample(model)
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if prefix is not None and (prefix.dim() != 2 or prefix.shape[0] != n or prefix.shape[1] > model.config.n_ctx):
        raise ValueError(f"prefix must be ({n}, P<={model.config.n_ctx}) ids, got {tuple(prefix.shape)}")
    if prefix is not None and prefix.numel() and (prefix.min() < 0 or prefix.max() >= model.config.n_vocab):
        raise ValueError(f"prefix ids must lie in [0, {model.config.n_vocab})")


def low_precision_copy(model: GPT, dtype: torch.dtype) -> GPT:
    """The model with every weight cast to ``dtype`` (built on the meta device: no second fp32 copy).
    Sampling in bf16 this way needs no autocast casts per step, and its residual stream is bf16 too."""
    if model.wte.weight.dtype == dtype:
        return model
    with torch.device("meta"):
        low = GPT(model.config, causal=model.causal)
    low.load_state_dict({k: v.detach().to(dtype) for k, v in model.state_dict().items()}, assign=True)
    return low.eval()


class Sampler:
    """Reusable sampling state for one model, batch size and dtype: the weights in ``dtype``, the KV cache,
    the static step's inputs and, on CUDA, its captured graphs. ``sample`` builds one per batch size;
    keep one to spread the graph captures over many batches (``igpt.bench.sample`` does)."""

    def __init__(self, model: GPT, batch: int, *, dtype: torch.dtype = torch.float32, window: int = 64,
                 cuda_graph: bool | None = None, compile: bool = False) -> None:
        check_can_sample(model)
        self.device = model.wte.weight.device
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        self.model = low_precision_copy(model.eval(), dtype)
        self.batch, self.window, self.T = batch, window, model.config.n_ctx
        self.graphs_on = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        # dynamic=True: one compilation serves every width (the widths differ only in the cache slice)
        self.decode_at = torch.compile(self.model.decode_at, dynamic=True) if compile else self.model.decode_at
        self.cache = self.model.new_cache(batch, self.device, dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # (B, 1) the pixel fed
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # (1,) where it is fed
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def width(self, pos: int) -> int:
        """Cache slots a step at ``pos`` attends: the next multiple of the window, at most n_ctx."""
        return min(self.T, math.ceil((pos + 1) / self.window) * self.window)

    def _forward(self, width: int) -> torch.Tensor:
        return self.decode_at(self.ids, self.pos, width, self.cache, masked=self.window > 1)

    def _capture(self, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (lazy kernel and workspace initialisation cannot be captured);
        # it writes the same key and value the replay writes, so it changes nothing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # every width shares one memory pool
            logits = self._forward(width)
        self.pool = graph.pool()
        return graph, logits

    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed ids (B, 1), pixel ``pos - 1``, at position ``pos``; logits (B, V) of pixel ``pos``."""
        self.ids.copy_(ids)
        self.pos.fill_(pos)  # a device-side fill: the host never waits
        width = self.width(pos)
        if not self.graphs_on:
            return self._forward(width)
        if width not in self.graphs:
            self.graphs[width] = self._capture(width)
        graph, logits = self.graphs[width]
        graph.replay()
        return logits

    @torch.no_grad()
    def run(self, prefix: torch.Tensor | None = None, *, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, generator: torch.Generator | None = None,
            bar: tqdm | None = None) -> torch.Tensor:
        """One batch: ids (B, T) whose first P pixels are ``prefix`` (B, P)."""
        for _, out in self.fill(prefix, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                bar=bar, every=self.T):
            pass
        return out

    @torch.no_grad()
    def fill(self, prefix: torch.Tensor | None = None, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, bar: tqdm | None = None,
             every: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
        """``run``, yielding (pixels filled, the ids (B, T) being filled: one tensor, updated in place) once
        with the prefix, then whenever the count of filled pixels reaches a multiple of ``every``, and at the
        end; positions not yet drawn hold 0. The draws are those of ``run``: yielding only lets a caller show
        the image as it grows."""
        B, T = self.batch, self.T
        out = torch.zeros(B, T, dtype=torch.long, device=self.device)
        P = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            out[:, :P] = prefix.to(self.device)
        yield P, out
        if P == T:
            return
        for layer_cache in self.cache:
            layer_cache.length = 0  # stale slots of an earlier batch are masked, and finite
        logits = self.model.decode_step(out[:, :P], self.cache)  # SOS + prefix in one pass -> pixel P
        for i in range(P, T):
            out[:, i] = draw(logits, temperature, top_k, top_p, generator)
            if i + 1 < T:
                logits = self.step(out[:, i:i + 1], i + 1)
            if bar is not None:
                bar.update(1)
            if (i + 1) % every == 0 or i + 1 == T:
                yield i + 1, out


@torch.no_grad()
def sample(model: GPT, n: int, *, prefix: torch.Tensor | None = None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32, batch_size: int | None = None, window: int = 64,
           cuda_graph: bool | None = None, compile: bool = False, progress: bool = False) -> torch.Tensor:
    """Sample ids (n, T) with a KV cache, keeping ``prefix`` (n, P) as the first P pixels, ``batch_size``
    images at a time (all n by default). ``generator`` must live on the model's device. ``cuda_graph``:
    None = on CUDA only."""
    _check(model, n, prefix, temperature)
    device, T = model.wte.weight.device, model.config.n_ctx
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the model on {device}; "
                         f"use make_generator(seed, device)")
    batch_size = n if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    P = 0 if prefix is None else prefix.shape[1]
    out = torch.empty(n, T, dtype=torch.long, device=device)
    sampler: Sampler | None = None
    starts = range(0, n, batch_size)
    with tqdm(total=len(starts) * (T - P), desc="sample", unit="px", disable=not progress) as bar:
        for start in starts:
            stop = min(n, start + batch_size)
            if sampler is None or sampler.batch != stop - start:  # the last, smaller batch needs its own
                sampler = None  # free the old cache first
                sampler = Sampler(model, stop - start, dtype=dtype, window=window, cuda_graph=cuda_graph,
                                  compile=compile)
            chunk = None if prefix is None else prefix[start:stop]
            out[start:stop] = sampler.run(chunk, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator, bar=bar)
    return out


def sample_rows(model: GPT, n: int, *, prefix: torch.Tensor | None = None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32, window: int = 64, cuda_graph: bool | None = None
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """``sample`` of n images in one batch, row by row: yields (rows complete, ids (n, T)) first with the
    rows ``prefix`` (n, P) completes, then after each row drawn (rows below it hold 0). The ids are a copy;
    the last equal ``sample``'s with the same generator."""
    _check(model, n, prefix, temperature)
    device, n_px = model.wte.weight.device, model.config.n_px
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the model on {device}; "
                         f"use make_generator(seed, device)")
    sampler = Sampler(model, n, dtype=dtype, window=window, cuda_graph=cuda_graph)
    # fill runs under no_grad one step at a time; the caller's grad mode is untouched between yields
    for filled, out in sampler.fill(prefix, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                    every=n_px):
        yield filled // n_px, out.clone()
