"""Where and in what precision computation runs: device choice, autocast and seeding, written once."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU. An unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 autocast on GPUs that support it (the matrix units' fast path) and fp32 elsewhere."""
    if name == "auto":
        # GPUs before Ampere (V100, T4) have no bf16 matrix units: fp32 there rather than a slow emulation
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` for matrix products; a no-op for fp32. Norms, softmax and losses stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether to torch.compile: 'on' / 'off' as asked; 'auto' only where inductor's GPU kernels run
    (triton importable, compute capability >= 7.0), so older GPUs and the CPU fall back to eager."""
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401  (inductor's GPU code generator)
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (7, 0)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for initialisation and dropout."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (e.g. seed, step, micro-batch)."""
    seq = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by ``derived_seed(*keys)``, so random draws at a given step are the same in a
    fresh run and after a resume, without saving any state."""
    return torch.Generator().manual_seed(derived_seed(*keys))
