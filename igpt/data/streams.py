"""Seeded, resumable streams of id batches for the training loop.

The order of images is a pure function of (seed, epoch), and every random draw of a batch (augmentation)
comes from a generator derived from (seed, epoch, position). So the stream's whole state is two integers,
and a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import math

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from igpt.data.augment import FolderImages, cifar_augment, cifar_augment_params
from igpt.data.imageset import ImageSet
from igpt.tokenizers import AnyTokenizer
from igpt.runtime import derived_generator


def to_ids(data: ImageSet, index: np.ndarray, tokenizer: AnyTokenizer, device: torch.device,
           augment: str = "none", generator: torch.Generator | None = None,
           rows: slice = slice(None)) -> torch.Tensor:
    """Images ``index[rows]`` of ``data`` as ids (B, T) int64 on ``device``. Pixels are moved as uint8 (4x
    less traffic than ids) and quantized on the device; CIFAR augmentation is applied to pixels before
    quantization, or to the id grid directly (crops and flips commute with per-pixel quantization). Its
    draws are made for all of ``index`` and then sliced by ``rows`` (a data-parallel rank's share)."""
    n = data.n_px
    params = cifar_augment_params(len(index), generator) if augment == "cifar" else None
    if params is not None:
        params = tuple(p[rows] for p in params)
    index = index[rows]
    if data.pixels is not None:
        pixels = torch.from_numpy(np.ascontiguousarray(data.pixels[index])).to(device, non_blocking=True)
        if params is not None:
            pixels = cifar_augment(pixels, None, params=params)  # (B, n, n, 3)
        return tokenizer.encode(pixels).reshape(len(index), -1)  # a palette's (B, n, n) or a VQ-VAE's (B, g, g)
    ids = torch.from_numpy(np.ascontiguousarray(data.ids[index]).astype(np.int64)).to(device)  # (B, T)
    if params is not None:
        if ids.shape[1] != n * n:
            raise ValueError(f"--data {data.source}: its ids are a {math.isqrt(ids.shape[1])}-wide grid of VQ-VAE "
                             f"codes of {n}x{n} images, which --augment cifar cannot shift by pixels; prepare "
                             "the images without --tokenizer to augment them")
        ids = cifar_augment(ids.view(-1, n, n, 1), None, params=params).reshape(len(index), n * n)
    return ids


class BatchStream:
    """Endless micro-batches of ``batch_size`` images, reshuffled each epoch; the last partial batch of an
    epoch is dropped, as image-gpt's ``iter_data(truncate=True)`` does."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int, tokenizer: AnyTokenizer, device: torch.device,
                 augment: str = "none", rows: slice = slice(None)) -> None:
        if len(data) < batch_size:
            raise ValueError(f"{data.source}: {len(data)} training images is fewer than --batch-size "
                             f"{batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.tokenizer, self.device, self.augment, self.rows = tokenizer.to(device), device, augment, rows
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.data):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        index = self._perm[self.pos:self.pos + self.batch_size]
        generator = derived_generator(self.seed, self.epoch, self.pos) if self.augment != "none" else None
        self.pos += self.batch_size
        return to_ids(self.data, index, self.tokenizer, self.device, self.augment, generator, self.rows)


def fixed_batches(data: ImageSet, batch_size: int, n_batches: int, tokenizer: AnyTokenizer,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """The first ``n_batches`` batches of ``data`` in stored order, unaugmented (for evaluation); the last
    batch may be smaller. ``n_batches=0`` means the whole split."""
    n = len(data) if n_batches == 0 else min(len(data), n_batches * batch_size)
    tokenizer = tokenizer.to(device)
    for start in range(0, n, batch_size):
        yield to_ids(data, np.arange(start, min(n, start + batch_size)), tokenizer, device)


class WorkerStream:
    """Batches decoded by DataLoader worker processes, with ``BatchStream``'s contract: ``next()`` -> ids
    (rows, T) int64 on ``device`` (quantized there), state = (epoch, pos), the last partial batch of an
    epoch dropped. A subclass says which dataset keys make this rank's share of each global batch from
    ``pos`` on (``_keys``), and may augment the batch on the device (``_augment``)."""

    def __init__(self, images: torch.utils.data.Dataset, n_items: int, batch_size: int, seed: int,
                 tokenizer: AnyTokenizer, device: torch.device, workers: int, rows: slice) -> None:
        self.images, self.n_items, self.batch_size, self.seed = images, n_items, batch_size, seed
        self.tokenizer, self.device, self.workers, self.rows = tokenizer.to(device), device, workers, rows
        self.epoch, self.pos, self._it = 0, 0, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self._it = int(state["epoch"]), int(state["pos"]), None

    def _keys(self) -> Any:
        raise NotImplementedError

    def _augment(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n_items:
            self.epoch, self.pos, self._it = self.epoch + 1, 0, None
        if self._it is None:
            share = len(range(self.batch_size)[self.rows])
            self._it = iter(torch.utils.data.DataLoader(
                self.images, batch_size=share, sampler=self._keys(), num_workers=self.workers,
                persistent_workers=False, pin_memory=self.device.type == "cuda"))
        pixels, _ = next(self._it)  # (rows, n_px, n_px, 3) uint8
        pixels = self._augment(pixels.to(self.device, non_blocking=True))
        self.pos += self.batch_size
        return self.tokenizer.encode(pixels).view(len(pixels), -1)


class FolderStream(WorkerStream):
    """Batches from an image folder, decoded and given the paper's ImageNet-style augmentation (random short
    side in [256, 384], random 224 crop, downscale) in DataLoader worker processes, so nothing but the file
    list is held in memory. Order from (seed, epoch), per-image randomness from (seed, epoch, index) inside
    ``FolderImages``."""

    def __init__(self, images: FolderImages, index: np.ndarray, batch_size: int, seed: int, tokenizer: AnyTokenizer,
                 device: torch.device, workers: int, rows: slice = slice(None)) -> None:
        if len(index) < batch_size:
            raise ValueError(f"{len(index)} training images is fewer than --batch-size {batch_size}")
        super().__init__(images, len(index), batch_size, seed, tokenizer, device, workers, rows)
        self.index = index

    def _keys(self) -> list[tuple[int, int]]:
        perm = self.index[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.index))]
        stop = len(perm) - len(perm) % self.batch_size  # drop the last partial batch
        # this rank's share of every global batch, in order
        return [(self.epoch, int(i)) for start in range(self.pos, stop, self.batch_size)
                for i in perm[start:start + self.batch_size][self.rows]]


def _labels_of(data: ImageSet, index: np.ndarray, device: torch.device) -> torch.Tensor:
    if data.labels is None:
        raise ValueError(f"--data {data.source}: this split has no labels")
    return torch.from_numpy(np.asarray(data.labels[index], dtype=np.int64)).to(device)  # (B,)


class LabelledBatchStream(BatchStream):
    """A BatchStream that also yields each batch's labels: ``next()`` -> (ids (B, T), labels (B,)). Same
    order, augmentation and resumable state as the unlabelled stream (fine-tuning)."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int, tokenizer: AnyTokenizer, device: torch.device,
                 augment: str = "none") -> None:
        _labels_of(data, np.arange(0), device)  # fail before the first batch, not at it
        super().__init__(data, batch_size, seed, tokenizer, device, augment)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ids = super().next()
        index = self._perm[self.pos - self.batch_size:self.pos]  # the images super().next() just read
        return ids, _labels_of(self.data, index, self.device)


def labelled_batches(data: ImageSet, batch_size: int, tokenizer: AnyTokenizer,
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All of ``data`` in stored order, unaugmented, as (ids (B, T), labels (B,)); the last batch may be
    smaller (evaluation)."""
    _labels_of(data, np.arange(0), device)
    tokenizer = tokenizer.to(device)
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(len(data), start + batch_size))
        yield to_ids(data, index, tokenizer, device), _labels_of(data, index, device)
