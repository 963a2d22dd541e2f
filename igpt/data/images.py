"""Single images: decoding any file Pillow reads into RGB, and bringing it to ``n_px`` x ``n_px``.

``to_n_px`` is the one resize used everywhere (datasets, ``igpt prepare``, image completion): box (area)
filter when shrinking, bicubic when enlarging, after a centre crop (``center``) or not (``squash``).
``encode_images`` (``igpt.encode_images``) is the front door from image files or PIL images to ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from igpt.config import RESIZE_MODES
from igpt.tokenizers import AnyTokenizer

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]  # a file, a PIL image or uint8 (H, W[, 3]) pixels

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _filter(src: float, dst: float) -> Image.Resampling:
    # Shrinking: box = the mean of the source pixels each output pixel covers, the area filter that does not
    # alias. Enlarging: bicubic, since a box filter would only repeat pixels.
    return Image.Resampling.BOX if dst < src else Image.Resampling.BICUBIC


def _resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resample one axis at a time so each axis gets its own filter (PIL is separable, so this equals one call)."""
    if img.width != width:
        img = img.resize((width, img.height), _filter(img.width, width), reducing_gap=None)
    if img.height != height:
        img = img.resize((width, height), _filter(img.height, height), reducing_gap=None)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white: the colour under a transparent pixel is
    arbitrary (often black or stale data), and white is what the image looks like on a page or a viewer."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: PIL's convert("L") clips at 255 instead of scaling, so scale 0..65535 -> 0..255.
        grey = np.asarray(img).astype(np.float64) / 257.0  # (H, W)
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError("32-bit float images (mode 'F') have no agreed 0..255 range")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # "L", "1", "P", "CMYK", "YCbCr", ...


def to_n_px(img: Image.Image | np.ndarray, n_px: int, mode: str = "center") -> np.ndarray:
    """An image -> uint8 (n_px, n_px, 3).

    ``center``: the paper's eval pipeline (shorter side -> n_px, centre crop). The centred square of side
    min(H, W) is cut first in source pixels (the same region, resampled once instead of twice), then resized.
    ``squash``: both sides to n_px, ignoring the aspect ratio. Shrinking uses a box (area) filter, enlarging
    bicubic. An image already n_px x n_px comes back unchanged.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {RESIZE_MODES}, got {mode!r}")
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3))):
            raise ValueError(f"to_n_px expects uint8 (H, W), (H, W, 1) or (H, W, 3), got {img.dtype} {img.shape}")
        img = Image.fromarray(np.ascontiguousarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img))
    img = to_rgb(img)
    if mode == "center":
        side = min(img.width, img.height)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return np.array(_resize(img, n_px, n_px), dtype=np.uint8)  # (n_px, n_px, 3), a writable copy


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode one file to an RGB PIL image; ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            # Camera photos store their rotation in EXIF; apply it so pixels are what a viewer shows.
            return to_rgb(ImageOps.exif_transpose(img))  # a loaded copy, valid after the file closes
    except DECODE_ERRORS as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e


def load_image(path: str | os.PathLike, n_px: int, resize: str = "center") -> np.ndarray:
    """One image file -> uint8 (n_px, n_px, 3)."""
    path = Path(path)
    if not path.is_file():
        if path.exists() and not path.is_dir():  # a pipe or a device: reading it could block forever
            raise ValueError(f"{path} is not a regular file, so not an image file")
        raise FileNotFoundError(f"{path}: no such image file")
    return to_n_px(open_image(path), n_px, resize)


def images_to_pixels(images: ImageLike | Sequence[ImageLike], n_px: int, resize: str = "center") -> np.ndarray:
    """Image files, PIL images or uint8 arrays (one, or a list) -> uint8 pixels (B, n_px, n_px, 3), each
    resized by ``to_n_px`` exactly as datasets are for training (``resize``: the ``--resize`` the model was
    trained with, ``center`` by default). A file that cannot be read is a ValueError naming it."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    one = isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and
                                                                  images.ndim in (2, 3))
    items = [images] if one else list(images)  # type: ignore[arg-type]
    if not items:
        raise ValueError("no images given")
    out = np.empty((len(items), n_px, n_px, 3), dtype=np.uint8)  # (B, n_px, n_px, 3)
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            out[i] = load_image(item, n_px, resize)
        elif isinstance(item, (Image.Image, np.ndarray)):
            out[i] = to_n_px(item, n_px, resize)
        else:
            raise TypeError(f"image {i} is a {type(item).__name__}; give a file path, a PIL image or a uint8 array")
    return out


def encode_images(images: ImageLike | Sequence[ImageLike], tokenizer: AnyTokenizer, n_px: int,
                  resize: str = "center") -> torch.Tensor:
    """``igpt.encode_images``: image files, PIL images or uint8 arrays -> ids (B, n_px**2) int64, ready for
    ``model(ids)``: the training resize (``images_to_pixels``) to the side the tokenizer reads
    (``tokenizer.pixel_side(n_px)``: n_px for a palette, a VQ-VAE's input side), then ``tokenizer.encode``.
    ``n_px`` is the model's, the side of its id grid."""
    pixels = images_to_pixels(images, tokenizer.pixel_side(n_px), resize)  # (B, side, side, 3)
    return tokenizer.encode(pixels).reshape(len(pixels), n_px * n_px)
