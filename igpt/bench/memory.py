"""Memory per GPU of a pretraining step: the formulas behind docs/scaling.md and ``igpt bench memory``.

Bytes, for P parameters, L layers of width d, T = n_px^2 positions, V tokenizer ids and a micro-batch of B
images per GPU, with fp32 master weights and bf16 autocast (``--dtype auto`` on a GPU):

- **state**: fp32 weights, fp32 gradients and Adam's two fp32 moments = 16 P, divided by the number of
  processes under FSDP (``--fsdp``), whole on every GPU under DDP.
- **autocast copies**: each matrix product saves the bf16 copy of its weight for the backward pass,
  2 bytes per matrix weight (24 d^2 per layer, 2 d V for the head) for the whole step; not sharded, also
  under FSDP. With checkpointing only the recomputed block's copies exist at once.
- **activations** (saved for the backward pass), per image: each layer keeps (52 d + 24) T bytes in bf16
  (88 d + 24 in fp32): the fp32 residual stream at both norms, the bf16 inputs of the four matrix
  products, q, k, v and the attention output (flash attention stores no T x T matrix), and the MLP's
  4d-wide pre-activation, sigmoid and product; plus (4 V + 10 d + 12) T for the final norm, the head
  and the loss's fp32 log-softmax. Measured exactly with ``saved_tensors_hooks`` on CPU (tests/
  test_memory.py). ``torch.compile`` recomputes the quick-GELU from the pre-activation instead of saving
  its two 4d-wide intermediates, about 16 d T less per layer (an estimate until measured on a GPU).
- **activation checkpointing** (``--grad-checkpoint``): a layer keeps only its fp32 input, 4 d T, and
  one layer's full activations exist at a time while it is recomputed.
- **FSDP working set**: the all-gathered fp32 weights of the block being computed and of the one being
  prefetched, 2 x 48 d^2.

Not counted: the CUDA context and allocator slack (a few GB; ``HEADROOM``), the data loader's pinned
buffers, and the communication buffers of DDP (its gradient buckets add up to 4 P more in the worst case).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from igpt.config import ModelConfig

GB = 1e9
HEADROOM = 0.1  # fraction of a GPU kept free for the CUDA context, fragmentation and workspace


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of one configuration."""

    state: float  # weights, gradients, Adam moments (sharded under FSDP)
    autocast_copies: float  # bf16 copies of the matrix weights kept for the backward pass
    fsdp_gathered: float  # all-gathered weights of the current and the prefetched block
    activations: float  # saved for the backward pass, for the whole micro-batch

    @property
    def total(self) -> float:
        return self.state + self.autocast_copies + self.fsdp_gathered + self.activations


def layer_activation_bytes(cfg: ModelConfig, bf16: bool = True, compiled: bool = False) -> float:
    """Bytes one layer saves for the backward pass, per image."""
    d, T = cfg.n_embd, cfg.n_ctx
    per_position = (52 if bf16 else 88) * d + 24
    if compiled:
        per_position -= (16 if bf16 else 32) * d  # the quick-GELU's sigmoid and product are recomputed
    return per_position * T


def head_activation_bytes(cfg: ModelConfig, bf16: bool = True) -> float:
    """Bytes the embedding, final norm, head and loss save per image."""
    return (4 * cfg.n_vocab + (10 if bf16 else 12) * cfg.n_embd + 12) * cfg.n_ctx


def activation_bytes(cfg: ModelConfig, batch: int, *, bf16: bool = True, grad_checkpoint: bool = False,
                     compiled: bool = False) -> float:
    """Activation memory of a micro-batch at its peak: the start of the backward pass, plus with
    checkpointing the one block being recomputed."""
    saved = batch * head_activation_bytes(cfg, bf16)
    if grad_checkpoint:
        return saved + batch * (cfg.n_layer * 4 * cfg.n_embd * cfg.n_ctx + layer_activation_bytes(cfg, bf16, compiled))
    return saved + batch * cfg.n_layer * layer_activation_bytes(cfg, bf16, compiled)


def plan(cfg: ModelConfig, batch: int, *, processes: int = 1, fsdp: bool = False, bf16: bool = True,
         grad_checkpoint: bool = False, compiled: bool = False) -> MemoryPlan:
    """Per-GPU memory of pretraining ``cfg`` with ``batch`` images per GPU on ``processes`` GPUs."""
    if batch < 1 or processes < 1:
        raise ValueError(f"need batch >= 1 and processes >= 1, got {batch} and {processes}")
    P, d, L = cfg.num_params(), cfg.n_embd, cfg.n_layer
    shards = processes if fsdp else 1
    copied_layers = 1 if grad_checkpoint else L  # checkpointing re-makes a block's copies when it recomputes it
    return MemoryPlan(state=16 * P / shards,
                      autocast_copies=2 * (12 * d * d * copied_layers + d * cfg.n_vocab) if bf16 else 0.0,
                      fsdp_gathered=2 * 48 * d * d if fsdp and processes > 1 else 0.0,
                      activations=activation_bytes(cfg, batch, bf16=bf16, grad_checkpoint=grad_checkpoint,
                                                   compiled=compiled))


def max_batch(cfg: ModelConfig, gpu_bytes: float, **kw) -> int:
    """The largest micro-batch whose plan fits in ``(1 - HEADROOM) * gpu_bytes`` (0 if none does)."""
    one = plan(cfg, 1, **kw)  # activations grow linearly with the batch; nothing else depends on it
    room = (1 - HEADROOM) * gpu_bytes - (one.total - one.activations)
    return max(0, int(room // one.activations))


def sampling_bytes(cfg: ModelConfig, batch: int, *, bytes_per_value: int = 2) -> float:
    """Memory of sampling ``batch`` images (``igpt bench sample``): the fp32 weights, their copy in the
    sampling dtype, the full KV cache (K and V of every layer, all T slots) and one step's logits in fp32."""
    P, d, L, T = cfg.num_params(), cfg.n_embd, cfg.n_layer, cfg.n_ctx
    return (4 + bytes_per_value) * P + batch * (2 * L * T * d * bytes_per_value + 4 * cfg.n_vocab)


def max_sampling_batch(cfg: ModelConfig, free_bytes: float, *, bytes_per_value: int = 2) -> int:
    """The largest sampling batch whose memory fits in ``(1 - HEADROOM) * free_bytes`` (0 if none does)."""
    fixed = sampling_bytes(cfg, 0, bytes_per_value=bytes_per_value)
    per_image = sampling_bytes(cfg, 1, bytes_per_value=bytes_per_value) - fixed
    return max(0, int(((1 - HEADROOM) * free_bytes - fixed) // per_image))


def host_available_bytes() -> float:
    """What the kernel says it can still give without swapping (MemAvailable), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: fall back to the free page count, which leaves out reclaimable caches
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: torch.device) -> float:
    """Memory a benchmark can still take on ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def check_fits(needed: float, device: torch.device, batch: int, largest: Callable[[float], int], what: str) -> None:
    """Refuse, in one line, a benchmark whose planned memory exceeds ``(1 - HEADROOM)`` of what ``device``
    has free, before it starts: a run past the host's RAM is killed by the kernel with no message, and one
    past the GPU's dies mid-compilation. ``largest(free)`` gives the batch that would fit."""
    free = available_bytes(device)
    if needed > (1 - HEADROOM) * free:
        fit = largest(free)
        hint = f"the largest batch that fits is {fit}" if fit else "not even a batch of 1 fits"
        raise ValueError(f"--batch-size {batch}: {what} needs {needed / GB:.3g} GB by the memory plan, but "
                         f"{device} has {free / GB:.3g} GB free (keeping {HEADROOM:.0%} of it spare); {hint}")


def format_plan(cfg: ModelConfig, batch: int, p: MemoryPlan) -> str:
    lines = [f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} T={cfg.n_ctx}: {cfg.num_params():,} parameters, "
             f"micro-batch {batch} per GPU"]
    for name in ("state", "autocast_copies", "fsdp_gathered", "activations"):
        lines.append(f"  {name.replace('_', ' '):<18} {getattr(p, name) / GB:9.2f} GB")
    lines.append(f"  {'total':<18} {p.total / GB:9.2f} GB (plus the CUDA context and allocator slack)")
    return "\n".join(lines)
