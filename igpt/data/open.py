"""The data of a pretraining run, opened the same way for ``igpt pretrain`` and ``igpt bench loader``: the
images a palette is fitted on (or checked against), the size of the training split, the validation set,
and a factory palette -> stream of id batches for whichever source ``--data`` names:

- a shards directory (``igpt prepare --shards`` or WebDataset tars): ``ShardStream``, decoded in workers;
- an image folder with ``--augment imagenet``: ``FolderStream``, decoded and augmented in workers;
- anything else (arrays, a prepared cache): ``BatchStream`` over memory-mapped or in-memory arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from igpt.data.augment import FolderImages
from igpt.config import DataConfig, TrainConfig
from igpt.data.cache import ImageSet, open_split
from igpt.data.streams import BatchStream, FolderStream, folder_splits
from igpt.palette import Palette
from igpt.data.shard_streams import open_shard_training
from igpt.data.shards import is_shard_dir

log = logging.getLogger(__name__)
PALETTE_FIT_IMAGES = 2000  # centre crops a palette is fitted on when training streams its images


@dataclass
class TrainingData:
    fit_set: ImageSet  # images to fit or check the palette on (all of train when it is in memory)
    n_train: int  # training images (one epoch)
    val_set: ImageSet | None  # None without a validation split or with --eval-every 0
    make_stream: Callable[[Palette], Any]  # palette -> stream with next() -> ids (rows, T) on the device


def open_training_data(cfg: TrainConfig, data_cfg: DataConfig, n_px: int, device: torch.device,
                       rows: slice = slice(None)) -> TrainingData:
    """Open ``data_cfg.data`` for training; ``rows`` is this process's share of each micro-batch."""
    data = data_cfg.data
    if is_shard_dir(data):  # streamed from tar shards, decoded in --workers processes
        return TrainingData(*open_shard_training(data, n_px, cfg, device, rows, PALETTE_FIT_IMAGES))
    if cfg.augment == "imagenet":
        images, train_idx, val = folder_splits(data, n_px, data_cfg.val_fraction, cfg.seed)
        fit_idx = np.random.default_rng(cfg.seed).permutation(train_idx)[:PALETTE_FIT_IMAGES]
        view = FolderImages(images.root, n_px, augment="center")
        fit_set = ImageSet(n_px, np.stack([view[int(i)][0].numpy() for i in fit_idx]), None, None, None, None, data)
        return TrainingData(fit_set, len(train_idx), val if cfg.eval_every else None, lambda palette: FolderStream(
            images, train_idx, cfg.batch_size, cfg.seed, palette, device, cfg.workers, rows))
    kw = {"n_px": n_px, "val_fraction": data_cfg.val_fraction, "seed": cfg.seed, "resize": data_cfg.resize}
    train = open_split(data, "train", **kw)
    return TrainingData(train, len(train), _open_val(cfg, data, kw), lambda palette: BatchStream(
        train, cfg.batch_size, cfg.seed, palette, device, cfg.augment, rows))


def _open_val(cfg: TrainConfig, data: str, kw: dict[str, Any]) -> ImageSet | None:
    if cfg.eval_every == 0:
        return None
    try:
        return open_split(data, "val", **kw)
    except ValueError as e:
        log.warning("no validation split, so no validation loss: %s", e)
        return None
