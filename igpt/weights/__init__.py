"""Weights in and out: igpt checkpoints, Hugging Face ImageGPT folders and OpenAI's released checkpoints,
all read through ``load`` (``igpt.weights.convert``)."""

from igpt.weights.checkpoint import resolve_checkpoint, save_checkpoint, step_checkpoints
from igpt.weights.convert import (Loaded, consolidate, convert_hf, convert_openai, export_hf, load, load_classifier,
                                 load_located, locate)

__all__ = ["Loaded", "consolidate", "convert_hf", "convert_openai", "export_hf", "load", "load_classifier", "load_located", "locate",
           "resolve_checkpoint", "save_checkpoint", "step_checkpoints"]
