"""Weights in and out: igpt checkpoints, Hugging Face ImageGPT folders and OpenAI's released checkpoints,
all read through ``load`` (``igpt.weights.convert``), by path or Hub id (``igpt.weights.hub``), and written
by ``save``; ``GPT`` is the model with the Hub's from_pretrained / save_pretrained / push_to_hub."""

from igpt.weights.checkpoint import resolve_checkpoint, save_checkpoint, step_checkpoints
from igpt.weights.convert import (GPT, Loaded, consolidate, convert_hf, convert_openai, export_hf, load,
                                  load_classifier, load_located, locate, save)

__all__ = ["GPT", "Loaded", "consolidate", "convert_hf", "convert_openai", "export_hf", "load", "load_classifier",
           "load_located", "locate", "resolve_checkpoint", "save", "save_checkpoint", "step_checkpoints"]
