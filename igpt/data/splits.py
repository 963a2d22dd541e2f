"""The seeded carves, in one place: a validation split out of train, a class-stratified carve, and balanced
low-data subsets. Each is a pure function of its seed, so every command that carves the same data with the
same seed gets the same images.

Split names: "train", "val", "test", "unlabeled" and "train_all" (the source's whole train split, including
whatever was carved out of it for "val").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test", "unlabeled", "train_all")


@dataclass
class RawSplit:
    """One split as a reader returns it: pixels already at n_px, or (OpenAI's files only) palette ids."""

    pixels: np.ndarray | None  # (N, n_px, n_px, 3) uint8
    ids: np.ndarray | None  # (N, T) uint16
    labels: np.ndarray | None  # (N,) int64, or None when unlabelled
    classes: list[str] | None

    def __len__(self) -> int:
        return len(self.pixels if self.pixels is not None else self.ids)

    def take(self, idx: np.ndarray) -> "RawSplit":
        pick = (lambda a: None if a is None else a[idx])
        return RawSplit(pick(self.pixels), pick(self.ids), pick(self.labels), self.classes)


def missing_split(split: str, source: str, available: list[str], val_fraction: float | None) -> ValueError:
    hint = ""
    if split == "val" and val_fraction == 0:
        hint = " (val_fraction is 0, so no val split is carved from train)"
    return ValueError(f"--data {source}: has no {split!r} split{hint}; available: {', '.join(available)}")


def check_names(names: tuple[str, ...]) -> None:
    for name in names:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")


def first_available(names: tuple[str, ...], available: list[str], source: str,
                    val_fraction: float | None) -> str:
    """The first of ``names`` that the data has; an error naming the first one asked for otherwise."""
    check_names(names)
    found = next((name for name in names if name in available), None)
    if found is None:
        raise missing_split(names[0], source, available, val_fraction)
    return found


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), each sorted, disjoint, together 0..n-1: ``round(val_fraction * n)`` images (at
    least 1 when val_fraction > 0 and n >= 2, never all) picked by ``default_rng(seed).permutation(n)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)  # never an empty val, never an empty train
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def carve_val(raw: dict[str, Any], val_fraction: float, seed: int) -> tuple[dict[str, Any], bool]:
    """Add "train_all" and, when the source has no val split, a carved "val" (``split_indices``; both keep
    the source order). A source's own val split is used as is. Splits are anything with ``len`` and
    ``take(indices)`` (a ``RawSplit``, or the shard writer's plan of files). Returns (splits, whether val was
    carved)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = dict(raw)
    if "train" not in raw:
        return out, False
    out["train_all"] = raw["train"]
    if "val" in raw or val_fraction == 0:
        return out, False
    train_idx, val_idx = split_indices(len(raw["train"]), val_fraction, seed)
    if len(val_idx) == 0:
        return out, False
    out["train"], out["val"] = raw["train"].take(train_idx), raw["train"].take(val_idx)
    return out, True


def stratified_carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit_idx, val_idx), sorted and disjoint: ``round(fraction * n_c)`` images of each class c (at least
    one, never all, when fraction > 0 and the class has two or more) picked by a seeded permutation."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = round(fraction * len(idx))
        if fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def balanced_subset(labels: np.ndarray, per_class: int, seed: int | list[int]) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every class, drawn without replacement by a generator
    seeded with ``seed`` (e.g. [seed, repeat])."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"--labels-per-class {per_class}: class {c} has only {len(idx)} training images")
        picks.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """k of 0..n-1 drawn with ``seed``, sorted; all of them when k >= n."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
