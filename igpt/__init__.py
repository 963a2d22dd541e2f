"""igpt: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in PyTorch."""

from igpt.weights.checkpoint import load
from igpt.config import PRESETS, DataConfig, ModelConfig, TrainConfig
from igpt.model import GPT
from igpt.palette import Palette

__all__ = ["GPT", "ModelConfig", "TrainConfig", "DataConfig", "PRESETS", "Palette", "load"]
__version__ = "0.1.0"
