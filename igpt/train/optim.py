"""The optimizer and learning-rate schedules of the paper's recipes (section 3.4): Adam(0.9, 0.95), linear
warm-up, then cosine decay to 0 (pretraining) or a constant rate (fine-tuning); no weight decay by default."""

from __future__ import annotations

import math

import torch
from torch import nn

from igpt.config import TrainConfig


def lr_at(step: int, *, lr: float, warmup: int, max_steps: int, min_lr_ratio: float = 0.0,
          decay: str = "cosine") -> float:
    """Learning rate for 0-based ``step``: linear warm-up over ``warmup`` steps, then ``decay``: "cosine"
    to ``lr * min_lr_ratio`` at ``max_steps``, or "constant"."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_lr(step: int, cfg: TrainConfig, warmup: int) -> float:
    """The pretraining schedule: warm-up, then cosine."""
    return lr_at(step, lr=cfg.lr, warmup=warmup, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_steps(cfg: TrainConfig, n_train: int) -> int:
    """Explicit steps, or (-1) one epoch as in the paper, capped at 10% of the run: the paper's runs are
    1M steps long, where one epoch is ~1%; a short run would otherwise never leave warm-up."""
    if cfg.warmup_steps >= 0:
        return cfg.warmup_steps
    epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum))
    return max(1, min(epoch, cfg.max_steps // 10))


def make_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """Adam(W), fused on CUDA; weight decay, when asked for, applies to weight matrices only (not gains or
    embeddings)."""
    def decays(name: str, p: torch.Tensor) -> bool:  # "wte.weight", or "gpt.wte.weight" under a classifier
        return p.dim() == 2 and name.split(".")[-2] not in ("wte", "wpe")

    named = list(model.named_parameters())
    decay = [p for n, p in named if decays(n, p)]
    other = [p for n, p in named if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device.type == "cuda")


def pretrain_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return make_optimizer(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                          device=device)
