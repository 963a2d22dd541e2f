"""igpt: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in PyTorch.

The public API: ``GPT`` and its ``ModelConfig`` (``PRESETS``), the ``Palette``, ``load`` for any weights
(returning the model, its palette and its ``CheckpointRecord``), ``sample`` and ``infill``, and
``pretrain``, ``resume`` and ``finetune``. The layers beneath are described in docs/architecture.md.
"""

from igpt.config import PRESETS, DataConfig, ModelConfig, TrainConfig
from igpt.generate import complete, infill, sample
from igpt.model import GPT
from igpt.palette import Palette
from igpt.record import CheckpointRecord, Reading
from igpt.train import finetune, pretrain, resume
from igpt.weights import load

__all__ = ["GPT", "CheckpointRecord", "DataConfig", "ModelConfig", "PRESETS", "Palette", "Reading",
           "TrainConfig", "complete", "finetune", "infill", "load", "pretrain", "resume", "sample"]
__version__ = "0.1.0"
