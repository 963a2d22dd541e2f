"""Model FLOPs, for model-FLOPs utilisation (MFU): the arithmetic the model needs, not what a kernel does.

Per token and layer the weight matrices cost 2 FLOPs per weight (q, k, v and output: 4 d^2 weights; the
MLP: 8 d^2), attention costs 2 T d for QK^T and 2 T d for AV over T keys, halved when causal (each query
sees on average half the keys, and flash kernels skip the masked half), and the head costs 2 d V. A
training step is three forward passes' worth (forward, and backward through activations and weights).

For igpt-s at T = 1024 this gives 530.1 MFLOP per trained token, so 549,000 tokens/s of training would be
291 TFLOP/s, 37% of an H100's 790 TFLOP/s bf16 matrix rate.
"""

from __future__ import annotations

import time

import torch

from igpt.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, *, causal: bool = True, seq_len: int | None = None) -> int:
    T = cfg.n_ctx if seq_len is None else seq_len
    d, L = cfg.n_embd, cfg.n_layer
    weights = 2 * (12 * L * d * d + d * cfg.n_vocab)
    attention = (2 if causal else 4) * L * T * d
    return weights + attention


def train_flops_per_token(cfg: ModelConfig, *, causal: bool = True) -> int:
    return 3 * forward_flops_per_token(cfg, causal=causal)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """The achieved rate (FLOP/s) of an n x n x n matrix product on ``device``: the denominator of MFU
    when a datasheet figure does not apply (CPU, clocks, a different card)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)
