"""The iGPT transformer, exactly as released (reference igpt.md section 2).

A pre-norm GPT-2 decoder with OpenAI's changes: a non-centred, bias-free norm (RMSNorm), no biases
anywhere, quick-GELU, a learned start-of-sequence *vector* (not a vocabulary row), learned absolute
positions and an untied, zero-initialised output head. The model knows nothing about objectives: it maps
ids to logits and exposes per-layer hidden states. Losses live in ``igpt.objectives``.

Input modes of ``GPT.forward(ids, causal=..., keep=..., sos=...)``; ``causal=None`` (the default) reads the
model the way its weights were trained, ``GPT(config, causal=...)``: ``igpt.load`` builds a BERT checkpoint's
model with ``causal=False``, so its plain ``model(ids)`` is the bidirectional forward.

- AR (``causal=True``): the input is ``[sos, wte[ids[:, :-1]]] + wpe``, attention is causal, so
  ``logits[:, i]`` is the distribution of pixel ``i`` given pixels ``< i``; all T pixels are scored.
- BERT (``causal=False``): the input is ``wte[ids] * keep + wpe`` (masked positions get a zero content
  embedding but keep their position), attention is bidirectional, no SOS.
- No-SOS causal (``causal=True, sos=False``): ``wte[ids] + wpe``, the layout Hugging Face's processor feeds;
  only for parity checks against their numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from igpt.config import ModelConfig

NORM_EPS = 1e-5  # inside the square root, as in OpenAI's norm()


class Norm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * g``: no mean subtraction and no bias (OpenAI's 'layer norm')."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, NORM_EPS)


class Attention(nn.Module):
    """Multi-head self-attention without biases, scaled by 1/sqrt(head_dim).

    OpenAI stores q/k/v as three [n_head, head_dim, n_embd] tensors; we fuse them into one
    ``c_attn`` Linear whose output rows are [q; k; v], each in the same ``h * head_dim + e`` order, so one
    matmul does all three and ``igpt.weights.hf`` converts by reshaping alone.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, causal: bool, cache: "LayerCache | None" = None,
                step: "DecodeStep | None" = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k, v, mask = cache.update(k, v, causal, step)  # the keys so far (B, H, S, hd) and which to see
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = h * torch.sigmoid(1.702 * h)  # quick-GELU, as in image-gpt (not GPT-2's tanh GELU)
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm residual block: ``h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = Norm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = Norm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, causal: bool, cache: "LayerCache | None" = None,
                step: "DecodeStep | None" = None) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), causal, cache, step)
        return h + self.mlp(self.ln_2(h))


class DecodeStep(NamedTuple):
    """One token fed at a position held in a device tensor, attending a fixed number of cache slots, so that
    every shape is static and one CUDA graph per ``width`` replays the step at any position."""

    pos: torch.Tensor  # (1,) int64: the position being fed, whose key and value are written
    width: int  # cache slots attended: pos < width <= n_ctx
    mask: torch.Tensor | None  # (1, width) additive: 0 up to pos, -inf after; None when width == pos + 1


class LayerCache:
    """Pre-allocated keys and values of one layer: (B, H, n_ctx, hd) each, filled left to right.

    Zero-filled, not empty: a windowed step (``DecodeStep``) reads slots past its position and masks them,
    and a NaN left in uninitialised memory would survive a -inf mask (0 * NaN = NaN)."""

    def __init__(self, B: int, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        shape = (B, config.n_head, config.n_ctx, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # slots written by append (not tracked by windowed steps)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def update(self, k: torch.Tensor, v: torch.Tensor, causal: bool,
               step: DecodeStep | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new keys and values (B, H, n, hd); return the keys and values to attend and the mask."""
        if step is not None:
            self.k.index_copy_(2, step.pos, k.to(self.k.dtype))  # a device-side index: no host sync
            self.v.index_copy_(2, step.pos, v.to(self.v.dtype))
            return self.k[:, :, :step.width], self.v[:, :, :step.width], step.mask
        T = k.shape[2]
        k, v = self.append(k, v)
        mask = None
        if T > 1 and causal:
            # New queries see every cached key plus the new keys up to themselves. SDPA's is_causal aligns
            # to the top-left corner, so a multi-token step past a filled prefix needs an explicit mask.
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(diagonal=S - T)
        return k, v, mask


class GPT(nn.Module):
    """iGPT. ``model(ids)`` with ids (B, T) int64 in [0, n_vocab) returns logits (B, T, n_vocab).

    ``causal``: how the weights were trained, and so how ``forward``, ``hidden_states`` and
    ``layer_features`` read ids unless told otherwise: True for AR, False for BERT. ``grad_checkpoint``
    (a training choice, off by default) recomputes each block in the backward pass."""

    def __init__(self, config: ModelConfig, *, causal: bool = True) -> None:
        super().__init__()
        self.config, self.causal, self.grad_checkpoint = config, causal, False
        d = config.n_embd
        self.wte = nn.Embedding(config.n_vocab, d)
        self.wpe = nn.Embedding(config.n_ctx, d)
        self.sos = nn.Parameter(torch.empty(d))  # AR only; BERT never reads it
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = Norm(d)
        self.lm_head = nn.Linear(d, config.n_vocab, bias=False)  # OpenAI's `wtet`, untied from wte
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released initialisation (reference igpt.md section 2.5), not GPT-2's."""
        d, L = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        nn.init.normal_(self.sos, std=0.02)
        nn.init.zeros_(self.lm_head.weight)  # the paper zero-initialises every projection to logits
        for block in self.blocks:
            nn.init.normal_(block.attn.c_attn.weight, std=1 / math.sqrt(d))
            nn.init.normal_(block.attn.c_proj.weight, std=1 / math.sqrt(d * L))
            nn.init.normal_(block.mlp.c_fc.weight, std=0.02)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
            nn.init.ones_(block.ln_1.weight)
            nn.init.ones_(block.ln_2.weight)
        nn.init.ones_(self.ln_f.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, ids: torch.Tensor, *, causal: bool | None = None, keep: torch.Tensor | None = None,
              sos: bool | None = None) -> torch.Tensor:
        """Input of block 0, (B, T, D), for the modes listed in the module docstring."""
        causal = self.causal if causal is None else causal
        B, T = ids.shape
        if T > self.config.n_ctx:
            raise ValueError(f"sequence of {T} positions exceeds n_ctx={self.config.n_ctx}")
        tok = self.wte(ids)  # (B, T, D)
        if keep is not None:
            tok = tok * keep.unsqueeze(-1).to(tok.dtype)  # BERT: masked positions lose their content only
        if causal and (sos is None or sos):
            # Shift right by one: position i sees pixels < i, and pixel 0 is predicted from the SOS vector.
            tok = torch.cat([self.sos.to(tok.dtype).expand(B, 1, -1), tok[:, :-1]], dim=1)
        h = tok + self.wpe.weight[:T]  # positions are added after the shift, so position i holds pixel i-1
        return F.dropout(h, self.config.dropout, self.training)

    def _run_blocks(self, h: torch.Tensor, causal: bool, upto: int | None = None) -> Iterator[torch.Tensor]:
        """The residual stream entering each block, then the stream after the last block run, one at a time:
        a caller that keeps only what it needs (the last state, or one pooled row per layer) holds one
        (B, T, D) state in inference instead of n_layer + 1 of them."""
        yield h
        for block in self.blocks[:upto]:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, causal, use_reentrant=False)
            else:
                h = block(h, causal)
            yield h

    def forward(self, ids: torch.Tensor, *, causal: bool | None = None, keep: torch.Tensor | None = None,
                sos: bool | None = None) -> torch.Tensor:
        causal = self.causal if causal is None else causal
        for h in self._run_blocks(self.embed(ids, causal=causal, keep=keep, sos=sos), causal):
            pass  # each state is dropped as soon as the next one exists
        return self.lm_head(self.ln_f(h))  # (B, T, V)

    def hidden_states(self, ids: torch.Tensor, *, causal: bool | None = None, keep: torch.Tensor | None = None,
                      sos: bool | None = None) -> list[torch.Tensor]:
        """n_layer + 1 tensors (B, T, D): entry l < L is the raw residual stream entering block l (entry 0
        is the embedding); entry L is the final ``ln_f`` output. This is Hugging Face's
        ``output_hidden_states`` convention."""
        causal = self.causal if causal is None else causal
        states = list(self._run_blocks(self.embed(ids, causal=causal, keep=keep, sos=sos), causal))
        return states[:-1] + [self.ln_f(states[-1])]

    def layer_features(self, ids: torch.Tensor, layers: Sequence[int] | None = None, *, causal: bool | None = None,
                       keep: torch.Tensor | None = None, sos: bool | None = None) -> dict[int, torch.Tensor]:
        """The paper's probe features (section 2.3), mean-pooled over positions: for layer l < L the output
        of block l's first norm, ``ln_1(h^l)``; for l = L, ``ln_f(h^L)``. Returns {l: (B, D)}. Blocks past
        the deepest requested layer are not run."""
        L = self.config.n_layer
        layers = list(range(L + 1)) if layers is None else sorted(set(layers))
        if not layers or layers[0] < 0 or layers[-1] > L:
            raise ValueError(f"layers must lie in 0..{L}, got {layers}")
        causal = self.causal if causal is None else causal
        norms = [b.ln_1 for b in self.blocks] + [self.ln_f]
        wanted, feats = set(layers), {}
        states = self._run_blocks(self.embed(ids, causal=causal, keep=keep, sos=sos), causal, upto=layers[-1])
        for l, h in enumerate(states):  # pooled as they pass: one (B, T, D) state at a time in inference
            if l in wanted:
                feats[l] = norms[l](h).float().mean(dim=1)
        return feats

    def forward_features(self, ids: torch.Tensor, *, causal: bool | None = None, keep: torch.Tensor | None = None,
                         sos: bool | None = None) -> torch.Tensor:
        """The final norm's output (B, T, D): what ``lm_head`` and a fine-tuned head (after a mean over
        positions) read. timm's name for the features before the head."""
        return self.hidden_states(ids, causal=causal, keep=keep, sos=sos)[-1]

    def forward_intermediates(self, ids: torch.Tensor, indices: int | Sequence[int] | None = None, *,
                              norm: bool = True, intermediates_only: bool = False, causal: bool | None = None,
                              keep: torch.Tensor | None = None, sos: bool | None = None
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-layer features, timm's way: ``(final, [features of each requested layer])``, or the list
        alone with ``intermediates_only`` (then blocks past the deepest requested layer are not run).

        ``indices``: layers in 0..n_layer (a list), the last n of them (an int), or all (None). Each entry is
        (B, T, D): with ``norm`` (default) the paper's probe features, ``ln_1(h^l)`` for l < L and
        ``ln_f(h^L)`` for l = L (``layer_features`` is their mean over positions); without it the raw
        residual stream entering block l (``hidden_states``' convention). ``final`` is ``forward_features``."""
        L = self.config.n_layer
        if indices is None:
            layers = list(range(L + 1))
        elif isinstance(indices, int):
            layers = list(range(L + 1 - indices, L + 1))
        else:
            layers = [int(i) for i in indices]
        if not layers or min(layers) < 0 or max(layers) > L:
            raise ValueError(f"indices must lie in 0..{L}, got {indices}")
        causal = self.causal if causal is None else causal
        upto = max(layers) if intermediates_only else None
        states = list(self._run_blocks(self.embed(ids, causal=causal, keep=keep, sos=sos), causal, upto=upto))
        norms = [b.ln_1 for b in self.blocks] + [self.ln_f]
        feats = [norms[l](states[l]) if norm or l == L else states[l] for l in layers]
        if intermediates_only:
            return feats
        return self.ln_f(states[-1]), feats

    # ---- cached decoding (used by igpt.generate.sample; the model itself stays objective-free) ----

    def new_cache(self, B: int, device: torch.device, dtype: torch.dtype) -> list[LayerCache]:
        return [LayerCache(B, self.config, device, dtype) for _ in self.blocks]

    def decode_step(self, ids: torch.Tensor, cache: list[LayerCache]) -> torch.Tensor:
        """AR decoding with a KV cache. ``ids`` (B, n) are the next n *known* pixels after what the cache
        holds (n = 0 allowed only on an empty cache). Feeds the SOS (first call) and those pixels, and
        returns logits (B, V) for the pixel that follows them."""
        start = cache[0].length
        B = ids.shape[0]
        tok = self.wte(ids)  # (B, n, D)
        if start == 0:
            tok = torch.cat([self.sos.to(tok.dtype).expand(B, 1, -1), tok], dim=1)
        if start + tok.shape[1] > self.config.n_ctx:
            raise ValueError(f"cannot decode past n_ctx={self.config.n_ctx}")
        h = tok + self.wpe.weight[start:start + tok.shape[1]]
        for block, layer_cache in zip(self.blocks, cache):
            h = block(h, True, layer_cache)
        return self.lm_head(self.ln_f(h[:, -1]))  # (B, V)

    def decode_at(self, ids: torch.Tensor, pos: torch.Tensor, width: int, cache: list[LayerCache],
                  masked: bool = True) -> torch.Tensor:
        """One AR step with static shapes: ``ids`` (B, 1) is pixel ``pos - 1``, fed at position ``pos``
        ((1,) int64 on the device, 1 <= pos < width), attending cache slots ``[0, width)`` with the slots
        past ``pos`` masked. Returns logits (B, V) of pixel ``pos``. Nothing here depends on the value of
        ``pos`` on the host, so a CUDA graph captured once per width replays every position in it.
        ``masked=False`` is allowed only when ``width == pos + 1``. Does not advance ``cache[i].length``."""
        mask = None
        if masked:
            slots = torch.arange(width, device=ids.device)
            mask = torch.zeros(1, width, dtype=cache[0].k.dtype, device=ids.device)
            mask = mask.masked_fill(slots > pos, float("-inf"))  # (1, width), broadcast over (B, H)
        step = DecodeStep(pos, width, mask)
        h = self.wte(ids) + self.wpe(pos)  # (B, 1, D)
        for block, layer_cache in zip(self.blocks, cache):
            h = block(h, True, layer_cache, step)
        return self.lm_head(self.ln_f(h[:, -1]))  # (B, V)
