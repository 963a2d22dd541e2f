"""The optimizer and learning-rate schedule of the paper's recipe (section 3.4): Adam(0.9, 0.95), linear
warm-up, cosine decay to 0, no weight decay by default."""

from __future__ import annotations

import math

import torch

from igpt.config import TrainConfig
from igpt.model import GPT


def lr_at(step: int, cfg: TrainConfig, warmup: int) -> float:
    """Learning rate for 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine to
    ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: TrainConfig, n_train: int) -> int:
    """Explicit steps, or (-1) one epoch as in the paper, capped at 10% of the run: the paper's runs are
    1M steps long, where one epoch is ~1%; a short run would otherwise never leave warm-up."""
    if cfg.warmup_steps >= 0:
        return cfg.warmup_steps
    epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum))
    return max(1, min(epoch, cfg.max_steps // 10))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam(W); weight decay, when asked for, applies to weight matrices only (not gains or embeddings)."""
    def decays(name: str, p: torch.Tensor) -> bool:
        return p.dim() == 2 and not name.startswith(("wte", "wpe"))

    named = list(model.named_parameters())
    decay = [p for n, p in named if decays(n, p)]
    other = [p for n, p in named if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type == "cuda")
