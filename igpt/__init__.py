"""igpt: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in PyTorch.

The public API: ``GPT`` (with the Hub's ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``) and its
``ModelConfig`` (``PRESETS``), the ``Palette`` and ``load_tokenizer`` (a palette or a VQ-VAE tokenizer file),
``load`` for any weights, by path or Hub id (returning the model, its tokenizer and its ``CheckpointRecord``)
and ``save``, its mirror; ``encode_images`` from image files or PIL images to ids with the training resize
(the tokenizer's ``decode_images`` goes back); ``sample`` and
``infill``; and ``pretrain``, ``resume`` and ``finetune``. The layers beneath are described in
docs/architecture.md.
"""

from igpt.config import PRESETS, DataConfig, ModelConfig, TrainConfig
from igpt.data.images import encode_images
from igpt.generate import complete, infill, sample
from igpt.tokenizers import Palette, load_tokenizer
from igpt.record import CheckpointRecord, Reading
from igpt.train import finetune, pretrain, resume
from igpt.weights import GPT, load, save

__all__ = ["GPT", "CheckpointRecord", "DataConfig", "ModelConfig", "PRESETS", "Palette", "Reading",
           "TrainConfig", "complete", "encode_images", "finetune", "infill", "load", "load_tokenizer", "pretrain",
           "resume", "sample", "save"]
__version__ = "0.1.0"
