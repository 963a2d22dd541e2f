from __future__ import annotations

import torch

from igpt.config import ModelConfig
from igpt.bench.flops import forward_flops_per_token, measure_matmul_flops, train_flops_per_token


def test_flops_hand_count_tiny():
    cfg = ModelConfig(n_layer=2, n_embd=4, n_head=2, n_px=2, n_vocab=8)  # T = 4
    # per layer: q,k,v,o 4*16 weights + MLP 2*4*16 weights = 192 weights -> 384 FLOPs; 2 layers -> 768
    # head: 4*8 weights -> 64 FLOPs; causal attention: 2 * T * d = 32 per layer -> 64
    assert forward_flops_per_token(cfg) == 768 + 64 + 64
    assert forward_flops_per_token(cfg, causal=False) == 768 + 64 + 128
    assert train_flops_per_token(cfg) == 3 * (768 + 64 + 64)


def test_flops_igpt_s_matches_the_quoted_utilisation():
    per_token = train_flops_per_token(ModelConfig.from_preset("igpt-s"))
    assert per_token == 530_055_168
    assert round(549_000 * per_token / 790e12, 2) == 0.37  # the 37% at 549k tokens/s


def test_matmul_rate_is_positive():
    assert measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, repeats=2) > 0
