"""``ImageSet``: one split of a dataset as arrays, the form every command but streaming training reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from igpt.tokenizers import AnyTokenizer


@dataclass
class ImageSet:
    n_px: int
    pixels: np.ndarray | None  # (N, n_px, n_px, 3) uint8, possibly np.memmap
    ids: np.ndarray | None  # (N, T) uint16, possibly np.memmap
    labels: np.ndarray | None  # (N,) int64
    classes: list[str] | None
    tokenizer_fingerprint: str | None  # set when the ids were made by one of our tokenizers
    source: str  # the --data spec, for messages

    def __len__(self) -> int:
        return len(self.pixels if self.pixels is not None else self.ids)

    def take(self, index: np.ndarray) -> "ImageSet":
        """The images ``index`` of this split, as a new in-memory ImageSet."""
        pick = (lambda a: None if a is None else np.asarray(a[index]))
        return ImageSet(self.n_px, pick(self.pixels), pick(self.ids), pick(self.labels), self.classes,
                        self.tokenizer_fingerprint, self.source)


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


def check_ids(images: ImageSet, tokenizer: AnyTokenizer, *, any_palette: bool = False) -> None:
    """The one check that ids fit a tokenizer: ids made by another of our tokenizers (by fingerprint), ids
    past its size, or ids without a fingerprint (OpenAI's pre-quantized files, and caches prepared from them
    without a tokenizer) met by a tokenizer that is not OpenAI's palette (``looks_like_openai``), unless
    ``any_palette``, are an error naming the data and the palette. Pixels need no check (they are
    quantized with ``tokenizer``)."""
    if images.ids is None:
        return
    have = tokenizer.fingerprint()
    word, unit = ("palette", "colours") if tokenizer.kind == "palette" else ("tokenizer", "codes")
    if images.tokenizer_fingerprint is not None and images.tokenizer_fingerprint != have:
        raise ValueError(f"--data {images.source}: ids were made with {word} {images.tokenizer_fingerprint} "
                         f"but the {word} given is {tokenizer.describe()}; use the {word} that prepared the data "
                         "or prepare again")
    top = int(np.max(images.ids)) if len(images) else -1
    if top >= tokenizer.k:
        raise ValueError(f"--data {images.source}: holds ids up to {top}, past the {tokenizer.k} {unit} (ids "
                         f"0..{tokenizer.k - 1}) of {word} {tokenizer.describe()}; use the {word} the data was "
                         "made with")
    if images.tokenizer_fingerprint is None and not any_palette and not tokenizer.looks_like_openai():
        fitted = " and was fitted by igpt" if tokenizer.meta else ""
        raise ValueError(f"--data {images.source}: holds OpenAI's pre-quantized ids, which record no palette, but "
                         f"{word} {tokenizer.describe()} is not OpenAI's kmeans_centers.npy: it has {tokenizer.k} "
                         f"{unit}{fitted} (theirs: 512 colours, no fit metadata); use that file, or --any-palette to "
                         "accept this one")
