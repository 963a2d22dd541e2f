"""Training batches streamed from a shards directory (``igpt.data.shards``): only the index is held in memory.

The order of an epoch is a pure function of (seed, epoch): the shards are permuted by
``default_rng([seed, epoch])``, the samples of shard s by ``default_rng([seed, epoch, s])``, and the epoch is
their concatenation, so reads stay within one or two shards at a time. Global batch k is positions
[k*B, (k+1)*B) of that sequence (the last partial batch is dropped); a data-parallel rank takes its ``rows``
of every global batch, and DataLoader workers each decode whole batches of that share. So across ranks and
workers each sample of an epoch is read exactly once, and the global batch does not depend on the number of
processes or workers. A sample's augmentation comes from ``default_rng([seed, epoch, index])`` (ImageNet
style, in the workers) or from ``derived_generator(seed, epoch, pos)`` for the whole global batch (CIFAR
style, on the device), so the stream's whole state is (epoch, pos), as for ``BatchStream``.
"""

from __future__ import annotations

import io
import logging
import operator
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from igpt.data.augment import cifar_augment, cifar_augment_params, imagenet_style
from igpt.data.imageset import ImageSet, check_labels
from igpt.data.images import open_image, to_n_px
from igpt.data.shards import ShardIndex, ShardSplit
from igpt.data.splits import first_available
from igpt.data.streams import WorkerStream
from igpt.tokenizers import AnyTokenizer
from igpt.runtime import derived_generator

log = logging.getLogger(__name__)


def _member_name(fd: int, offset: int) -> str:
    """The tar member name in the header just before ``offset`` (for messages only)."""
    header = os.pread(fd, 512, offset - 512) if offset >= 512 else b""
    if len(header) == 512 and header[257:262] == b"ustar":
        name, prefix = (header[a:b].split(b"\0", 1)[0].decode(errors="replace") for a, b in ((0, 100), (345, 500)))
        return f"{prefix}/{name}" if prefix else name
    return f"the member at byte {offset}"


class ShardImages(torch.utils.data.Dataset):
    """A split of a shards directory as a map-style dataset.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` -> (pixels uint8 (n_px, n_px, 3), label or -1). The bytes of a
    sample are one ``os.pread`` (no shared file position, so processes forked with open files are safe);
    files are opened lazily, once per process. ``augment``: "imagenet" (the paper's, with the random state
    ``default_rng([seed, epoch, i])``, as ``FolderImages``) or "center" (``to_n_px`` centre crop).
    """

    def __init__(self, split: ShardSplit, n_px: int, *, augment: str = "center", seed: int = 0) -> None:
        if augment not in ("imagenet", "center"):
            raise ValueError(f"ShardImages: augment must be 'imagenet' or 'center', got {augment!r}")
        self.split, self.n_px, self.augment, self.seed = split, n_px, augment, seed
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.split)

    def __getstate__(self) -> dict[str, Any]:  # file descriptors do not travel to spawned workers
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            new = os.open(self.split.tars[shard], os.O_RDONLY)
            fd = self._fds.setdefault(shard, new)  # atomic: a thread that lost the race closes its own
            if fd != new:
                os.close(new)
        return fd

    def where(self, i: int) -> str:
        """"shard.tar: member name" of sample i, for messages (one extra read, so only on errors)."""
        shard = self.split.shard_of(i)
        return f"{self.split.tars[shard]}: {_member_name(self._fd(shard), int(self.split.rows[i, 0]))}"

    def read(self, i: int) -> bytes:
        """The stored bytes of sample i."""
        shard = self.split.shard_of(i)
        offset, size, _ = (int(v) for v in self.split.rows[i])
        blob = os.pread(self._fd(shard), size, offset)
        if len(blob) != size:
            raise ValueError(f"{self.where(i)} is cut short ({len(blob)} of {size} bytes): the shard is "
                             "truncated; write it again")
        return blob

    def image(self, i: int) -> Image.Image:
        try:
            return open_image(io.BytesIO(self.read(i)))
        except ValueError as e:
            if e.__cause__ is None:  # not a decoding error (a truncated shard): already names the file
                raise
            raise ValueError(f"{self.where(i)} is not a readable image: {e.__cause__}") from e

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        i = operator.index(i)
        if not 0 <= i < len(self.split):
            raise IndexError(f"ShardImages: index {i} out of range for {len(self.split)} images")
        img = self.image(i)
        if self.augment == "imagenet":
            pixels = imagenet_style(img, self.n_px, np.random.default_rng([self.seed, operator.index(epoch), i]))
        else:
            pixels = to_n_px(img, self.n_px, "center")
        return torch.from_numpy(pixels), int(self.split.rows[i, 2])


def global_batches(starts: np.ndarray, seed: int, epoch: int, batch_size: int, pos: int = 0
                   ) -> Iterator[np.ndarray]:
    """The global batches (B,) of sample indices of one epoch, from position ``pos`` (see the module
    docstring). Shards wholly before ``pos`` are skipped without drawing their permutation."""
    counts = np.diff(starts)
    pending, seen = np.empty(0, np.int64), 0  # seen: positions of the epoch before the current shard
    for s in np.random.default_rng([seed, epoch]).permutation(len(counts)):
        n = int(counts[s])
        if seen + n <= pos:
            seen += n
            continue
        order = starts[s] + np.random.default_rng([seed, epoch, int(s)]).permutation(n)
        pending = np.concatenate([pending, order[max(0, pos - seen):]])
        seen += n
        full = len(pending) - len(pending) % batch_size
        yield from (pending[k:k + batch_size] for k in range(0, full, batch_size))
        pending = pending[full:]
    # what is left in pending is the dropped partial batch


class _RankKeys:
    """The DataLoader sampler: (epoch, index) keys of this rank's rows of each global batch, in order."""

    def __init__(self, starts: np.ndarray, seed: int, epoch: int, batch_size: int, pos: int, rows: slice) -> None:
        self.starts, self.seed, self.epoch = starts, seed, epoch
        self.batch_size, self.pos, self.rows = batch_size, pos, rows

    def __len__(self) -> int:
        share = len(range(self.batch_size)[self.rows])
        return max(0, (int(self.starts[-1]) - self.pos) // self.batch_size) * share

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for batch in global_batches(self.starts, self.seed, self.epoch, self.batch_size, self.pos):
            yield from ((self.epoch, int(i)) for i in batch[self.rows])


class ShardStream(WorkerStream):
    """Endless micro-batches from a shards split (``WorkerStream``'s contract). ``augment``: "none", "cifar"
    (on the device, draws for the whole global batch sliced by ``rows``) or "imagenet" (in the ``workers``)."""

    def __init__(self, split: ShardSplit, batch_size: int, seed: int, tokenizer: AnyTokenizer, device: torch.device,
                 n_px: int, augment: str = "none", workers: int = 0, rows: slice = slice(None)) -> None:
        if len(split) < batch_size:
            raise ValueError(f"{split.tars[0].parent}: {len(split)} {split.name} images is fewer than "
                             f"--batch-size {batch_size}")
        if augment not in ("none", "cifar", "imagenet"):
            raise ValueError(f"--augment must be 'none', 'cifar' or 'imagenet', got {augment!r}")
        images = ShardImages(split, n_px, augment="imagenet" if augment == "imagenet" else "center", seed=seed)
        super().__init__(images, len(split), batch_size, seed, tokenizer, device, workers, rows)
        self.split, self.n_px, self.augment = split, n_px, augment

    def _keys(self) -> _RankKeys:
        return _RankKeys(self.split.starts, self.seed, self.epoch, self.batch_size, self.pos, self.rows)

    def _augment(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.augment != "cifar":
            return pixels
        params = cifar_augment_params(self.batch_size, derived_generator(self.seed, self.epoch, self.pos))
        return cifar_augment(pixels, None, params=tuple(p[self.rows] for p in params))


def decode_images(split: ShardSplit, n_px: int, index: np.ndarray) -> np.ndarray:
    """Centre crops (len(index), n_px, n_px, 3) uint8 of some samples, decoded on a thread pool (PIL
    releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    images = ShardImages(split, n_px, augment="center")
    out = np.empty((len(index), n_px, n_px, 3), np.uint8)

    def work(k: int) -> None:
        out[k] = images[int(index[k])][0].numpy()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(work, range(len(index))), total=len(index), desc=f"decode {split.name}",
                  unit="img", disable=len(index) < 5000))
    images.close()
    return out


def check_n_px(index: ShardIndex, n_px: int, augment: str) -> None:
    if index.n_px is not None and index.n_px != n_px:
        raise ValueError(f"--data {index.root}: shards hold {index.n_px}x{index.n_px} images, but {n_px}x{n_px} "
                         f"images are needed here; write shards from the source again with 'igpt prepare "
                         f"--shards N --n-px {n_px}'")
    if augment == "imagenet" and index.n_px is not None:
        raise ValueError(f"--augment imagenet needs full-resolution images, but {index.root} holds "
                         f"{index.n_px}x{index.n_px} images from an array source; use --augment cifar or none, "
                         "or write shards from an image folder")


def open_shard_split(data: str, names: tuple[str, ...], n_px: int) -> tuple[ImageSet, str]:
    """(the first split of ``names`` a shards directory has, decoded (centre crops) into an in-memory
    ImageSet, for the commands that need a split as arrays (palette fit, score, probe, ...); its name).
    "train_all" is train followed by a carved val (not the source's order)."""
    index = ShardIndex.open(data)
    check_n_px(index, n_px, "none")
    stored = list(index.splits)
    split = first_available(names, stored + (["train_all"] if "train" in stored else []), str(data), None)
    names = ["train", "val"] if split == "train_all" and index.val_carved else \
        ["train" if split == "train_all" else split]
    parts = [index.split(name) for name in names]
    labeled = all(p.labeled for p in parts)
    labels = np.concatenate([p.labels for p in parts]) if labeled else None
    if labels is not None:  # .cls members past the classes of shards.json
        check_labels(labels, index.classes, f"{data}: the .cls labels of the {split} shards")
    log.info("%s: decoding the %d %s images of the shards into memory", data, sum(map(len, parts)), split)
    pixels = np.concatenate([decode_images(p, n_px, np.arange(len(p))) for p in parts])
    return ImageSet(n_px, pixels, None, labels, index.classes if labeled else None, None, str(data)), split
