"""The paper's augmentations (reference igpt.md section 11).

- ``cifar_augment``: WRN-style, used for CIFAR fine-tuning: reflect-pad 4 px, random crop, random flip.
- ``imagenet_style``: ImageNet pretraining: shorter side uniform in [256, 384], random 224x224 crop,
  downsample to n_px.
- ``FolderImages``: a Dataset over an image folder that applies ``imagenet_style`` on the fly with a
  per-sample seed, so a sample's augmentation does not depend on the worker or on resuming.
"""

from __future__ import annotations

import logging
import operator
import os

import numpy as np
import torch
from PIL import Image

from igpt.data.images import open_image, to_n_px, to_rgb
from igpt.data.sources import list_image_folder, split_folders

log = logging.getLogger(__name__)

CROP = 224  # the paper's crop before downsampling to the input resolution
SHORT_SIDE = (256, 384)  # range of the random shorter side, inclusive


def cifar_augment_params(batch: int, generator: torch.Generator, pad: int = 4
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draws of ``cifar_augment``, in order: row offsets (B,), column offsets (B,), both in 0..2*pad
    into the padded image, and flips (B,) bool. Drawn on CPU so CPU and GPU runs pick the same crops."""
    if generator.device.type != "cpu":
        raise ValueError(f"cifar_augment needs a CPU torch.Generator, got one on {generator.device}")
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.randint(0, 2, (batch,), generator=generator).bool()
    return dy, dx, flip


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Coordinates in -pad..size-1+pad -> source coordinates under reflect padding (edge not repeated,
    as numpy's and torch's mode="reflect")."""
    idx = idx.abs()
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def cifar_augment(pixels: torch.Tensor, generator: torch.Generator | None, *, pad: int = 4,
                  params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 on any device -> (B, H, W, 3): reflect-pad ``pad`` px, random HxW crop, random
    horizontal flip (p=0.5), per image. One gather: the padded image is never built. Any channel count and
    dtype work the same, e.g. an id grid (B, H, W, 1): crops and flips commute with per-pixel quantization."""
    if pixels.ndim != 4:
        raise ValueError(f"cifar_augment expects pixels (B, H, W, C), got {tuple(pixels.shape)}")
    b, h, w, _ = pixels.shape
    if not 0 <= pad < min(h, w):
        raise ValueError(f"cifar_augment: reflect padding of {pad} px needs images larger than {pad}, got {h}x{w}")
    # ``params`` (from cifar_augment_params) lets a data-parallel rank apply its slice of the draws made for
    # the whole batch, so the augmentation does not depend on how many processes share the batch.
    dy, dx, flip = params if params is not None else cifar_augment_params(b, generator, pad)
    rows = torch.arange(h)[None] + dy[:, None] - pad  # (B, H), in source coordinates before reflecting
    cols = torch.arange(w)[None].expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None] - pad  # (B, W); flip = read the crop backwards
    dev = pixels.device
    rows, cols = _reflect(rows, h).to(dev), _reflect(cols, w).to(dev)
    batch = torch.arange(b, device=dev)[:, None, None]
    return pixels[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def imagenet_style(img: Image.Image, n_px: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's ImageNet pretraining augmentation -> uint8 (n_px, n_px, 3).

    Draws the shorter side s ~ U{256..384} and a 224x224 crop position in the resized image, then resamples
    that crop's region of the *source* straight to n_px: the same region as resize -> crop -> downsample,
    resampled once instead of twice (box filter when shrinking, bicubic when enlarging).
    """
    img = to_rgb(img)
    w, h = img.size
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    sw, sh = max(CROP, round(w * short / min(w, h))), max(CROP, round(h * short / min(w, h)))  # resized size
    x0, y0 = int(rng.integers(0, sw - CROP + 1)), int(rng.integers(0, sh - CROP + 1))
    sx, sy = sw / w, sh / h  # resized pixels per source pixel
    box = (x0 / sx, y0 / sy, (x0 + CROP) / sx, (y0 + CROP) / sy)  # the crop, in source coordinates
    region = min(box[2] - box[0], box[3] - box[1])
    resample = Image.Resampling.BOX if region > n_px else Image.Resampling.BICUBIC
    return np.array(img.resize((n_px, n_px), resample, box=box, reducing_gap=None), dtype=np.uint8)


class FolderImages(torch.utils.data.Dataset):
    """A labelled (class sub-folders) or flat image folder, augmented on the fly.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` -> (pixels uint8 (n_px, n_px, 3), label or -1). The random
    state of a sample is ``default_rng([seed, epoch, i])``, so it does not depend on which worker loads it
    or on resuming. ``augment="center"`` is the deterministic eval view (``to_n_px`` centre crop).
    With ``on_error="skip"`` an unreadable file is replaced by the next readable one (warned once per file).
    """

    def __init__(self, root: str | os.PathLike, n_px: int, *, augment: str = "imagenet", seed: int = 0,
                 on_error: str = "stop") -> None:
        if augment not in ("imagenet", "center"):
            raise ValueError(f"FolderImages: augment must be 'imagenet' or 'center', got {augment!r}")
        if on_error not in ("stop", "skip"):
            raise ValueError(f"FolderImages: on_error must be 'stop' or 'skip', got {on_error!r}")
        if n_px < 1 or seed < 0:
            raise ValueError(f"FolderImages: need n_px >= 1 and seed >= 0, got n_px={n_px}, seed={seed}")
        if not os.path.isdir(root):
            raise ValueError(f"{root}: not a directory of images")
        if split_folders(root):
            raise ValueError(f"{root}: holds train/val/test sub-folders; pass one of them, e.g. {root}/train")
        self.root = root
        self.paths, self.labels, self.classes = list_image_folder(root)
        self.n_px, self.augment, self.seed, self.on_error = n_px, augment, seed, on_error
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int, rng: np.random.Generator) -> np.ndarray:
        img = open_image(self.paths[i])
        if self.augment == "imagenet":
            return imagenet_style(img, self.n_px, rng)
        return to_n_px(img, self.n_px, "center")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.paths)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"FolderImages: index {index} out of range for {n} images")
        index %= n
        rng = np.random.default_rng([self.seed, operator.index(epoch), index])
        for k in range(n):
            i = (index + k) % n
            try:
                pixels = self._load(i, rng)
            except ValueError as e:
                if self.on_error == "stop":
                    raise
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning("skipping unreadable image: %s", e)
                continue
            label = -1 if self.labels is None else int(self.labels[i])
            return torch.from_numpy(pixels), label
        raise ValueError(f"FolderImages: none of the {n} images could be read")
