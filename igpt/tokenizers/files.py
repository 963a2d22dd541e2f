"""The one front door for tokenizer files: ``load_tokenizer(path)`` reads a palette or a VQ-VAE tokenizer, and
both answer the same questions, so every command takes either through ``--tokenizer``.

| interface                | ``Palette`` (``.palette``)                | ``VQTokenizer`` (``.vq``)                   |
|--------------------------|-------------------------------------------|---------------------------------------------|
| ``kind``                 | ``"palette"``                             | ``"vqvae"``                                 |
| ``k`` / ``vocab_size``   | colours                                   | codes                                       |
| ``encode(pixels)``       | uint8 (..., 3) -> ids (...), per pixel    | uint8 (B, S, S, 3) -> ids (B, g, g)         |
| ``decode_images(ids)``   | (B, T) or (B, g, g) -> (B, g, g, 3)       | (B, T) or (B, g, g) -> (B, S, S, 3)         |
| ``grid``, ``input_side`` | None: any side, the grid is the image     | g and S = g * factor                        |
| ``pixel_side(grid)``     | ``grid``                                  | S (and the grid must be g)                  |
| ``fingerprint()``        | sha256 of the centres                     | sha256 of the shape and every tensor        |

A model's ``n_px`` is always the side of its id grid (``T = n_px**2``); the images a tokenizer reads are
``pixel_side(n_px)`` on a side. A palette file is ``.npy`` (OpenAI's ``kmeans_centers.npy``) or ``.npz``; a VQ
tokenizer file is ``.safetensors`` whose header metadata holds its kind, shape and fit record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from igpt.tokenizers.palette import EXTENSIONS as PALETTE_EXTENSIONS
from igpt.tokenizers.palette import Palette
from igpt.tokenizers.vq import VQ_EXTENSION, VQTokenizer

PALETTE_FILE, VQ_FILE = "palette.npz", "tokenizer.safetensors"  # the tokenizer inside a checkpoint or run
AnyTokenizer = Union[Palette, VQTokenizer]  # both answer the interface in the table above


def load_tokenizer(path: str | os.PathLike[str]) -> AnyTokenizer:
    """A palette (.npy, .npz) or a VQ-VAE tokenizer (.safetensors), by its extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in PALETTE_EXTENSIONS:
        return Palette.load(path)
    if ext == VQ_EXTENSION:
        return VQTokenizer.load(path)
    raise ValueError(f"tokenizer file {path} must be a palette ({', '.join(PALETTE_EXTENSIONS)}) or a VQ-VAE "
                     f"tokenizer ({VQ_EXTENSION})")


def file_name(tok: AnyTokenizer) -> str:
    """The name a tokenizer is stored under inside a checkpoint, run or cache directory."""
    return VQ_FILE if tok.kind == "vqvae" else PALETTE_FILE


def save_in(tok: AnyTokenizer, directory: str | os.PathLike[str]) -> Path:
    """Write ``tok`` into ``directory`` under ``file_name``; returns the file."""
    path = Path(directory) / file_name(tok)
    tok.save(path)
    return path


def stored_in(directory: str | os.PathLike[str]) -> Path | None:
    """The tokenizer file a checkpoint, run or cache directory holds (a VQ tokenizer first), or None."""
    for name in (VQ_FILE, PALETTE_FILE):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_from(directory: str | os.PathLike[str]) -> AnyTokenizer:
    """The tokenizer stored in ``directory``; an error naming it when there is none."""
    path = stored_in(directory)
    if path is None:
        raise FileNotFoundError(f"{directory} holds no tokenizer ({PALETTE_FILE} or {VQ_FILE})")
    return load_tokenizer(path)


def recorded_fingerprint(record: dict[str, Any]) -> str | None:
    """The tokenizer fingerprint a JSON record (a cache's meta.json, a run's run.json) names, or None. Release
    0.1 wrote it as ``palette_fingerprint``; such files keep reading."""
    value = record.get("tokenizer_fingerprint", record.get("palette_fingerprint"))
    return value if isinstance(value, str) else None


def require_palette(tok: AnyTokenizer, what: str) -> Palette:
    """``tok`` as a Palette, or a one-line error saying that ``what`` knows only palettes."""
    if not isinstance(tok, Palette):
        raise ValueError(f"{what} knows only palettes; tokenizer {tok.describe()} is a {tok.kind}")
    return tok
