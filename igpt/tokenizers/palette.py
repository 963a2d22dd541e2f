"""The 512-colour palette of iGPT: k-means centres over RGB pixels scaled to [-1, 1].

Formulas follow OpenAI's ``utils.py:color_quantize`` / ``run.py:sample`` and Hugging Face's
``ImageGPTImageProcessor`` (reference igpt.md section 4):

- normalise: ``x = pixels / 127.5 - 1`` (float32);
- encode:    ``id = argmin_k ||c_k||^2 - 2 x.c_k`` (``||x||^2`` is the same for every k, so it is dropped);
- decode:    ``pixels = uint8(rint(127.5 * (c_id + 1)))``.

``Palette.fit`` is weighted k-means on the *distinct* colours of the pixels: pixels are uint8 RGB, so a few
million of them hold far fewer distinct values, and k-means on (colour, count) pairs is exactly k-means on
the pixels themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.arrays import UNREADABLE, array_error
from igpt.atomic import replacing
from igpt.config import N_VOCAB
from igpt.tokenizers.kmeans import default_chunk, default_device, kmeans_pp, lloyd, nearest, unique_colours

EXTENSIONS = (".npy", ".npz")  # .npy: OpenAI's kmeans_centers.npy layout; .npz: centres plus our fit metadata
_RANGE_SLACK = 1e-6  # centres may sit a float32 rounding outside [-1, 1]


def _as_pixels(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3) ndarray or tensor -> tensor (..., 3), sharing memory where possible."""
    if isinstance(pixels, np.ndarray):
        if pixels.dtype != np.uint8:
            raise ValueError(
                f"pixels must be uint8 RGB values in 0..255, got dtype {pixels.dtype}; "
                "scale floats to 0..255 and convert with .astype(np.uint8)"
            )
        arr = np.ascontiguousarray(pixels)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. np.load mmap)
            arr = arr.copy()
        t = torch.from_numpy(arr)
    elif isinstance(pixels, torch.Tensor):
        if pixels.dtype != torch.uint8:
            raise ValueError(
                f"pixels must be uint8 RGB values in 0..255, got dtype {pixels.dtype}; "
                "scale floats to 0..255 and convert with .to(torch.uint8)"
            )
        t = pixels
    else:
        raise TypeError(f"pixels must be a numpy array or torch tensor, got {type(pixels).__name__}")
    if t.ndim < 1 or t.shape[-1] != 3:
        raise ValueError(f"pixels must have a last dimension of 3 (R, G, B), got shape {tuple(t.shape)}")
    return t


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3) -> float32 (N, 3) in [-1, 1], exactly as OpenAI and Hugging Face scale pixels."""
    return pixels.to(torch.float32) / 127.5 - 1


class Palette:
    """K colours in [-1, 1] (K = 512 in the paper); maps uint8 pixels to ids and back. As a tokenizer
    (``igpt.tokenizers``) it makes one id per pixel at any image side: its grid is the image."""

    kind = "palette"
    grid: int | None = None  # any side: the id grid is the image itself
    input_side: int | None = None

    def __init__(self, centers: np.ndarray | torch.Tensor) -> None:
        if isinstance(centers, torch.Tensor):
            c = centers.detach().to(device="cpu", dtype=torch.float32).clone()
        else:
            c = torch.from_numpy(np.array(centers, dtype=np.float32))
        if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 2:
            raise ValueError(f"palette centres must have shape (K, 3) with K >= 2, got {tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise ValueError("palette centres must be finite")
        if c.abs().max() > 1 + _RANGE_SLACK:
            raise ValueError(f"palette centres must lie in [-1, 1], got values up to {c.abs().max():.6g}")
        self.centers = c  # (K, 3) float32
        self.meta: dict[str, Any] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # per-device copies, built on use
        self.source: str | None = None  # the file it was loaded from, for messages

    @property
    def k(self) -> int:
        return self.centers.shape[0]

    vocab_size = k

    def pixel_side(self, grid: int) -> int:
        """The image side a model with an id grid of ``grid`` reads: the grid itself."""
        return grid

    def __repr__(self) -> str:
        return f"Palette(k={self.k}, fingerprint={self.fingerprint()})"

    def describe(self) -> str:
        """How messages name this palette: its file (when loaded from one) and fingerprint."""
        return f"{self.source} ({self.fingerprint()})" if self.source else self.fingerprint()

    def looks_like_openai(self) -> bool:
        """Whether this can be OpenAI's kmeans_centers.npy, the palette of their pre-quantized ids (which
        carry no fingerprint): 512 colours and no fit metadata. ``load`` reads a plain (K, 3) .npy, OpenAI's
        layout, with empty meta, and an .npz copy of it (a run's or a converted checkpoint's palette.npz)
        keeps meta empty; every palette ``fit`` makes records its fit."""
        return self.k == N_VOCAB and not self.meta

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centres (K, 3), ||c||^2 (K,), arange(K) float32, decoded colours uint8 (K, 3)) on device."""
        if device not in self._tables:
            c = self.centers.to(device)
            # torch.round rounds half to even, exactly as np.rint does.
            decoded = torch.round(127.5 * (c + 1)).clamp_(0, 255).to(torch.uint8)  # (K, 3)
            ramp = torch.arange(self.k, dtype=torch.float32, device=device)
            self._tables[device] = (c, (c * c).sum(1), ramp, decoded)
        return self._tables[device]  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> "Palette":
        """A palette with the same centres and meta whose centres live on device."""
        out = Palette(self.centers.cpu())
        out.centers = self.centers.to(device)
        out.meta, out.source = dict(self.meta), self.source
        return out

    def encode(self, pixels: np.ndarray | torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """uint8 pixels (..., 3) -> int64 ids (...), on the pixels' device (CPU for numpy input).

        Works through `chunk` pixels at a time, so memory stays O(chunk * K); None picks 2048 on CPU,
        1 << 18 on other devices.
        """
        px = _as_pixels(pixels)
        flat = px.reshape(-1, 3)  # (N, 3)
        chunk = default_chunk(flat.device) if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        c, c_sq, ramp, _ = self._on(flat.device)
        ids = torch.empty(flat.shape[0], dtype=torch.int64, device=flat.device)
        # Normalise per block too: a float32 copy of all the pixels would be 4x their size.
        for s in range(0, flat.shape[0], chunk):
            ids[s : s + chunk] = nearest(_normalise(flat[s : s + chunk]), c, c_sq, ramp)
        return ids.reshape(px.shape[:-1])

    def decode(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ids (...) in [0, K) -> uint8 pixels (..., 3) = rint(127.5 * (c_id + 1)), on the ids' device."""
        if isinstance(ids, np.ndarray):
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.k):  # checked before a uint64 could wrap
                raise ValueError(f"ids must lie in [0, {self.k}), got values {ids.min()}..{ids.max()}")
            t = torch.from_numpy(ids.astype(np.int64))
        elif isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
            t = ids.to(torch.int64)
            if t.numel() and bool((t.min() < 0) | (t.max() >= self.k)):
                raise ValueError(f"ids must lie in [0, {self.k}), got values {int(t.min())}..{int(t.max())}")
        else:
            raise TypeError(f"ids must be a numpy array or torch tensor, got {type(ids).__name__}")
        return self._on(t.device)[3][t]

    def decode_images(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ids of whole images, (B, T) with T = n_px**2 in raster order or (B, n_px, n_px), -> uint8 images
        (B, n_px, n_px, 3), ready for ``PIL.Image.fromarray(images[i].numpy())``."""
        shape = tuple(ids.shape)
        if len(shape) == 3 and shape[1] == shape[2]:
            return self.decode(ids)
        n_px = math.isqrt(shape[-1]) if len(shape) == 2 else 0
        if n_px < 1 or n_px * n_px != shape[-1]:
            raise ValueError(f"ids must be (B, T) with T a square number of pixels, or (B, n_px, n_px); got "
                             f"shape {shape}")
        return self.decode(ids).reshape(shape[0], n_px, n_px, 3)

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over the float32 little-endian centres: names a palette in metadata."""
        raw = self.centers.detach().cpu().numpy().astype("<f4").tobytes()
        return hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def fit(
        cls,
        pixels: np.ndarray | torch.Tensor,
        k: int = 512,
        iters: int = 30,
        seed: int = 0,
        device: str | torch.device | None = None,
        max_pixels: int = 5_000_000,
        tol: float = 1e-4,
        progress: bool = False,
    ) -> "Palette":
        """Weighted k-means (k-means++ init, Lloyd) over the distinct colours of uint8 pixels (..., 3).

        Deterministic for a fixed seed and device. ``meta`` records the fit: ``inertia`` is the mean squared
        distance per pixel in [-1, 1] units (summed over channels), ``mse_uint8`` the mean squared error per
        channel value in 0..255 units of decode(encode(pixels)) against the pixels used.
        """
        if k < 2 or iters < 0 or max_pixels < 1 or tol < 0:
            raise ValueError(
                "fit needs k >= 2, iters >= 0, max_pixels >= 1, tol >= 0; "
                f"got {k=} {iters=} {max_pixels=} {tol=}"
            )
        dev = default_device(device)
        flat = _as_pixels(pixels).reshape(-1, 3)  # (N, 3)
        gen = torch.Generator().manual_seed(seed)  # CPU generator: the same draws whatever the device
        n_given = int(flat.shape[0])
        if n_given > max_pixels:
            flat = flat[torch.randperm(n_given, generator=gen)[:max_pixels].to(flat.device)]

        colours, counts = unique_colours(flat.to(dev))  # (U, 3) uint8, (U,) int64
        n_unique = int(colours.shape[0])
        if n_unique < k:
            raise ValueError(f"cannot fit k={k} colours: the pixels hold only {n_unique} distinct colours")
        points, weights = _normalise(colours), counts.to(torch.float64)  # (U, 3), (U,)
        init = kmeans_pp(points.cpu(), weights.cpu(), k, gen)
        res = lloyd(points, weights, init.to(dev), iters, tol=tol, progress=progress)

        palette = cls(res.centers)
        # res.labels is encode() of the distinct colours under the final centres: this is decode(encode(p)).
        err = (palette._on(dev)[3][res.labels].float() - colours.float()).pow(2).sum(1)  # (U,)
        mse = float((err.double() * weights).sum() / (3 * weights.sum()))
        palette.meta = dict(k=k, iters_run=res.iters_run, seed=seed, n_pixels=int(flat.shape[0]),
                            n_pixels_given=n_given, n_unique=n_unique, inertia=res.inertia, mse_uint8=mse)
        return palette

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write .npy (OpenAI's layout: plain (K, 3) float32) or .npz (centres + meta JSON), atomically."""
        path = Path(path)
        ext = _check_extension(path)
        centers = self.centers.detach().cpu().numpy().astype(np.float32)
        # Through a file handle: np.save / np.savez would append an extension to the temporary name.
        with replacing(path) as tmp, open(tmp, "xb") as f:
            if ext == ".npy":
                np.save(f, centers)
            else:
                np.savez(f, centers=centers, meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Palette":
        """Read a palette written by save(), or OpenAI's kmeans_centers.npy (float32 or float64)."""
        path = Path(path)
        ext = _check_extension(path)
        if not path.is_file():
            raise FileNotFoundError(f"palette file {path} does not exist")
        try:
            centers, meta = _read(path, ext)
        except UNREADABLE as e:  # e.g. an object array, or not .npy / .npz at all
            raise ValueError(f"palette file {path} could not be read: {array_error(e)}") from e
        if centers.ndim != 2 or centers.shape[1:] != (3,):
            raise ValueError(f"palette file {path} holds an array of shape {centers.shape}, expected (K, 3)")
        if not np.issubdtype(centers.dtype, np.floating):
            raise ValueError(f"palette file {path} holds dtype {centers.dtype}, expected float32 or float64")
        try:
            palette = cls(centers.astype(np.float32))
        except ValueError as e:
            raise ValueError(f"palette file {path}: {e}") from e
        palette.meta, palette.source = meta, str(path)
        return palette


def _read(path: Path, ext: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The raw centres array and meta dict of a palette file (meta is empty for .npy)."""
    data = np.load(path, allow_pickle=False)  # an ndarray for .npy contents, an NpzFile for .npz
    if isinstance(data, np.ndarray) != (ext == ".npy"):
        raise ValueError(f"its contents do not match its {ext} extension")
    if isinstance(data, np.ndarray):
        return data, {}
    with data:
        if "centers" not in data.files:
            raise ValueError(f"no 'centers' array (found {data.files})")
        try:
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        except ValueError as e:
            raise ValueError(f"its meta is not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"its meta is a JSON {type(meta).__name__}, not an object")
        return data["centers"], meta


def _check_extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"palette file {path} must end in one of {', '.join(EXTENSIONS)}")
    return ext
