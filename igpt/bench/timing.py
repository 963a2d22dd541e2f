"""What every benchmark shares: timing between device synchronisations, the device's name, and random
models of a preset's shape (speed does not depend on the weights' values)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from igpt.config import ModelConfig
from igpt.model import GPT

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def random_model(config: ModelConfig, device: torch.device, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # a zero head would make every draw uniform
    return model.to(device).eval()


def timed_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of fn() with the device idle before and finished after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
