"""Seeded, resumable streams of id batches for the training loop.

The order of images is a pure function of (seed, epoch), and every random draw of a batch (augmentation)
comes from a generator derived from (seed, epoch, position). So the stream's whole state is two integers,
and a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from igpt.augment import cifar_augment
from igpt.data import ImageSet
from igpt.palette import Palette
from igpt.runtime import derived_generator


def to_ids(data: ImageSet, index: np.ndarray, palette: Palette, device: torch.device,
           augment: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``index`` of ``data`` as ids (B, T) int64 on ``device``. Pixels are moved as uint8 (4x less
    traffic than ids) and quantized on the device; CIFAR augmentation is applied to pixels before
    quantization, or to the id grid directly (crops and flips commute with per-pixel quantization)."""
    n = data.n_px
    if data.pixels is not None:
        pixels = torch.from_numpy(np.ascontiguousarray(data.pixels[index])).to(device, non_blocking=True)
        if augment == "cifar":
            pixels = cifar_augment(pixels, generator)  # (B, n, n, 3)
        return palette.encode(pixels).view(len(index), n * n)
    ids = torch.from_numpy(np.ascontiguousarray(data.ids[index]).astype(np.int64)).to(device)  # (B, T)
    if augment == "cifar":
        ids = cifar_augment(ids.view(-1, n, n, 1), generator).reshape(len(index), n * n)
    return ids


class BatchStream:
    """Endless micro-batches of ``batch_size`` images, reshuffled each epoch; the last partial batch of an
    epoch is dropped, as image-gpt's ``iter_data(truncate=True)`` does."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int, palette: Palette, device: torch.device,
                 augment: str = "none") -> None:
        if len(data) < batch_size:
            raise ValueError(f"{data.source}: {len(data)} training images is fewer than --batch-size "
                             f"{batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.palette, self.device, self.augment = palette.to(device), device, augment
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
        return to_ids(self.data, index, self.palette, self.device, self.augment, generator)


def fixed_batches(data: ImageSet, batch_size: int, n_batches: int, palette: Palette,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """The first ``n_batches`` batches of ``data`` in stored order, unaugmented (for evaluation); the last
    batch may be smaller. ``n_batches=0`` means the whole split."""
    n = len(data) if n_batches == 0 else min(len(data), n_batches * batch_size)
    palette = palette.to(device)
    for start in range(0, n, batch_size):
        yield to_ids(data, np.arange(start, min(n, start + batch_size)), palette, device)
