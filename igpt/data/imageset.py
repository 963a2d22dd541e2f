"""``ImageSet``: one split of a dataset as arrays, the form every command but streaming training reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from igpt.palette import Palette


@dataclass
class ImageSet:
    n_px: int
    pixels: np.ndarray | None  # (N, n_px, n_px, 3) uint8, possibly np.memmap
    ids: np.ndarray | None  # (N, T) uint16, possibly np.memmap
    labels: np.ndarray | None  # (N,) int64
    classes: list[str] | None
    palette_fingerprint: str | None  # set when the ids were made by one of our palettes
    source: str  # the --data spec, for messages

    def __len__(self) -> int:
        return len(self.pixels if self.pixels is not None else self.ids)

    def take(self, index: np.ndarray) -> "ImageSet":
        """The images ``index`` of this split, as a new in-memory ImageSet."""
        pick = (lambda a: None if a is None else np.asarray(a[index]))
        return ImageSet(self.n_px, pick(self.pixels), pick(self.ids), pick(self.labels), self.classes,
                        self.palette_fingerprint, self.source)


def check_labels(labels: np.ndarray, classes: list[str] | None, where: str) -> np.ndarray:
    """Class ids (N,) as int64, or an error naming ``where`` (the file, and the array in it). Labels must be
    integers (floats are cast to class ids nowhere: 2.7 is no class), >= 0, and each must have a name when
    the data names its classes (a head sized by the names would not have a row for it)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integer class ids, got dtype {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {int(labels.min())}")
    if classes is not None and labels.size and int(labels.max()) >= len(classes):
        raise ValueError(f"{where}: label {int(labels.max())} has no class name: the data names {len(classes)} "
                         f"classes (0..{len(classes) - 1})")
    return labels.astype(np.int64, copy=False)


def check_ids(images: ImageSet, palette: Palette) -> None:
    """The one check that ids fit a palette: ids made by another of our palettes (by fingerprint), or ids
    past the palette's size, are an error naming the data. Pixels need no check (they are quantized with
    ``palette``); ids without a fingerprint (OpenAI's pre-quantized files) can only be range-checked."""
    if images.ids is None:
        return
    have = palette.fingerprint()
    if images.palette_fingerprint is not None and images.palette_fingerprint != have:
        raise ValueError(f"--data {images.source}: ids were made with palette {images.palette_fingerprint} "
                         f"but the palette given is {have}; use the palette that prepared the data or prepare "
                         "again")
    if len(images) and int(np.max(images.ids)) >= palette.k:
        raise ValueError(f"--data {images.source}: holds id {int(np.max(images.ids))} but the palette has only "
                         f"{palette.k} colours; use the palette the data was prepared with")
