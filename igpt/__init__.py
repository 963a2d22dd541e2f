"""igpt: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in PyTorch.

The public API: ``GPT`` (with the Hub's ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``) and its
``ModelConfig`` (``PRESETS``), the ``Palette``, ``load`` for any weights, by path or Hub id (returning the
model, its palette and its ``CheckpointRecord``) and ``save``, its mirror; ``encode_images`` from image
files or PIL images to ids with the training resize (``Palette.decode_images`` goes back); ``sample`` and
``infill``; and ``pretrain``, ``resume`` and ``finetune``. The layers beneath are described in
docs/architecture.md.
"""

from igpt.config import PRESETS, DataConfig, ModelConfig, TrainConfig
from igpt.data.images import encode_images
from igpt.generate import complete, infill, sample
from igpt.palette import Palette
from igpt.record import CheckpointRecord, Reading
from igpt.train import finetune, pretrain, resume
from igpt.weights import GPT, load, save

__all__ = ["GPT", "CheckpointRecord", "DataConfig", "ModelConfig", "PRESETS", "Palette", "Reading",
           "TrainConfig", "complete", "encode_images", "finetune", "infill", "load", "pretrain", "resume",
           "sample", "save"]
__version__ = "0.1.0"
