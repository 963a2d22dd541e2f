"""Datasets: every ``--data`` opens through ``igpt.data.open`` (see its table of kinds)."""

from igpt.data.imageset import ImageSet, check_ids
from igpt.data.open import (DataSpec, TrainingData, lossless_mask, open_eval, open_labelled, open_split,
                            open_training, prepare, resolve)

__all__ = ["DataSpec", "ImageSet", "TrainingData", "check_ids", "lossless_mask", "open_eval", "open_labelled",
           "open_split", "open_training", "prepare", "resolve"]
