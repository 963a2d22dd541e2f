from __future__ import annotations

from pathlib import Path

import pytest
import torch

from igpt.config import ModelConfig
from igpt.model import GPT

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def randomize(model: GPT, seed: int = 0, scale: float = 0.3) -> GPT:
    """Give every parameter (including the zero-initialised head and unit gains) random values, so tests of
    dependence between positions cannot pass merely because logits are identically zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if ".ln_" in name or name.startswith("ln_f") else 0.0  # norm gains stay near 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + offset)
    return model


@pytest.fixture
def nano_config() -> ModelConfig:
    return ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4)


@pytest.fixture
def nano_model(nano_config: ModelConfig) -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(nano_config)).eval()


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not present (the shared data folder sits beside the repository)")
    return path
