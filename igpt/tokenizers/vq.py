"""A fitted VQ-VAE used as a tokenizer (``VQTokenizer``), and its file: one ``.safetensors`` whose header
metadata holds its kind, shape and fit record. Images of ``input_side`` become a ``grid`` x ``grid`` of ids
(the paper's high-resolution tokenizer, section 3.2); the network is ``igpt.tokenizers.vqvae``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from igpt.atomic import replacing
from igpt.config.tokenizer import VQConfig
from igpt.tensorfile import first_nonfinite, require_fields, require_finite, require_tensors, shapes_of
from igpt.tokenizers.vqvae import VQVAE, config_fields

VQ_KIND = "igpt-vqvae-tokenizer"
VQ_FORMAT = "1"
VQ_EXTENSION = ".safetensors"
FINGERPRINT_NAMES = {"vocab_size": "codebook_size"}  # VQConfig field -> its name in the fingerprint
_ENCODE_CHUNK = 256  # images per encoder pass: bounds the activations' memory
T = TypeVar("T")


class VQTokenizer:
    """A fitted VQ-VAE used as a tokenizer: uint8 images of ``input_side`` -> a ``grid`` x ``grid`` of ids."""

    kind = "vqvae"

    def __init__(self, model: VQVAE, meta: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.config: VQConfig = model.config
        self.meta: dict[str, Any] = dict(meta or {})
        self.source: str | None = None
        self.grid, self.input_side = self.config.grid, self.config.input_side
        self._fingerprint: str | None = None

    @property
    def k(self) -> int:
        return self.config.vocab_size

    vocab_size = k

    def __repr__(self) -> str:
        return (f"VQTokenizer(k={self.k}, {self.input_side}x{self.input_side} -> {self.grid}x{self.grid}, "
                f"fingerprint={self.fingerprint()})")

    def describe(self) -> str:
        """How messages name this tokenizer: its file (when loaded from one) and fingerprint."""
        return f"{self.source} ({self.fingerprint()})" if self.source else self.fingerprint()

    def looks_like_openai(self) -> bool:
        return False  # OpenAI's pre-quantized ids are ids of their palette

    def pixel_side(self, grid: int) -> int:
        """The image side a model with an id grid of ``grid`` reads: this tokenizer's input side."""
        if grid != self.grid:
            raise ValueError(f"tokenizer {self.describe()} makes a {self.grid}x{self.grid} grid of ids, but the "
                             f"model's n_px is {grid}")
        return self.input_side

    def to(self, device: str | torch.device) -> "VQTokenizer":
        """This tokenizer with its network on ``device`` (moved in place: the weights are read-only here)."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, S, S, 3) with S = input_side -> int64 ids (B, g, g), on the pixels' device."""
        px = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
        if px.dtype != torch.uint8:
            raise ValueError(f"pixels must be uint8 RGB values in 0..255, got dtype {px.dtype}")
        if px.ndim != 4 or px.shape[1:] != (self.input_side, self.input_side, 3):
            raise ValueError(f"tokenizer {self.describe()} encodes {self.input_side}x{self.input_side} RGB images "
                             f"(B, {self.input_side}, {self.input_side}, 3); got shape {tuple(px.shape)}")
        dev = self.device
        out = torch.empty((px.shape[0], self.grid, self.grid), dtype=torch.int64, device=px.device)
        for s in range(0, px.shape[0], _ENCODE_CHUNK):
            x = px[s:s + _ENCODE_CHUNK].to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1  # (b, 3, S, S)
            out[s:s + _ENCODE_CHUNK] = self.model.encode_ids(x).to(px.device)
        return out

    def _ids(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ids (B, T) or (B, g, g), checked, as an int64 tensor (B, g, g)."""
        t = torch.from_numpy(np.asarray(ids).astype(np.int64)) if isinstance(ids, np.ndarray) else ids
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"ids must be an integer array or tensor, got {getattr(ids, 'dtype', type(ids))}")
        t = t.to(torch.int64)
        g = self.grid
        if not ((t.ndim == 2 and t.shape[1] == g * g) or (t.ndim == 3 and t.shape[1:] == (g, g))):
            raise ValueError(f"ids must be (B, {g * g}) or (B, {g}, {g}) for tokenizer {self.describe()}; got "
                             f"shape {tuple(t.shape)}")
        if t.numel() and bool((t.min() < 0) | (t.max() >= self.k)):
            raise ValueError(f"ids must lie in [0, {self.k}), got values {int(t.min())}..{int(t.max())}")
        return t.reshape(-1, g, g)

    def decode_images(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ids (B, T) or (B, g, g) -> uint8 images (B, S, S, 3), on the ids' device (CPU for numpy)."""
        t = self._ids(ids)
        out = torch.empty((t.shape[0], self.input_side, self.input_side, 3), dtype=torch.uint8, device=t.device)
        for s in range(0, t.shape[0], _ENCODE_CHUNK):
            y = self.model.decode_ids(t[s:s + _ENCODE_CHUNK].to(self.device))  # (b, 3, S, S) in [-1, 1]
            out[s:s + _ENCODE_CHUNK] = to_pixels(y).to(t.device)
        return out

    decode = decode_images  # a VQ code has no colour of its own: ids decode as whole images

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over the shape and every tensor (name, dtype, bytes) in name order. The
        shape is hashed under the field names of the first file format (``codebook_size``), so that a
        tokenizer keeps its fingerprint, and the caches and checkpoints that name it keep matching it."""
        if self._fingerprint is None:
            shape = {FINGERPRINT_NAMES.get(k, k): v for k, v in self.config.to_dict().items()}
            h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
            for name, t in sorted(self.model.state_dict().items()):
                h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as one .safetensors file, atomically."""
        path = Path(path)
        if path.suffix.lower() != VQ_EXTENSION:
            raise ValueError(f"VQ-VAE tokenizer file {path} must end in {VQ_EXTENSION}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise FloatingPointError(f"tokenizer {path}: tensor {bad!r} holds NaN or infinite values; not written")
        header = {"igpt_kind": VQ_KIND, "format_version": VQ_FORMAT, "config": json.dumps(self.config.to_dict()),
                  "meta": json.dumps(self.meta), "fingerprint": self.fingerprint()}
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "VQTokenizer":
        """The tokenizer in a file ``save`` wrote. The header's config is a claim until checked: the sizes it
        gives (hidden, res_blocks, ...) must be those of the stored tensors before a network is built."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        where = f"tokenizer file {path}"
        header, shapes = _read_vq(path, lambda f: (f.metadata() or {}, shapes_of(f)))
        if header.get("igpt_kind") != VQ_KIND:
            what = header.get("igpt_kind") or "no igpt tokenizer header"
            raise ValueError(f"{where} is not a VQ-VAE tokenizer ({what}); pass a palette (.npz, .npy) "
                             "or a file written by 'igpt tokenizer fit'")
        if header.get("format_version") != VQ_FORMAT:
            raise ValueError(f"{where}: format_version {header.get('format_version')!r}, this igpt reads {VQ_FORMAT}")
        fields = _header_json(header, "config", where)
        try:
            config = VQConfig.from_dict(fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: config: {e}") from None
        meta = _header_json(header, "meta", where, "{}")
        require_fields(config.to_dict(), config_fields(shapes), f"{where}: config", "the file")
        model = VQVAE(config)  # its size is now that of the stored tensors
        require_tensors(shapes, {k: tuple(v.shape) for k, v in model.state_dict().items()}, where)
        tensors = _read_vq(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})
        require_finite(tensors, where)
        model.load_state_dict(tensors, strict=True)
        tok = cls(model, meta)
        tok.source = str(path)
        if header.get("fingerprint") not in (None, tok.fingerprint()):
            raise ValueError(f"{where}: its tensors have fingerprint {tok.fingerprint()}, the header "
                             f"records {header['fingerprint']}; the file is damaged")
        return tok


def _read_vq(path: Path, read: Callable[[Any], T]) -> T:
    """``read(f)`` of the open safetensors file ``path``; an error naming it when the file is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"tokenizer file {path} could not be read (truncated or not safetensors): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _header_json(header: dict[str, str], key: str, where: str, default: str | None = None) -> dict[str, Any]:
    """The JSON object the header holds under ``key`` (the config, the meta); an error naming the file and
    the key when it is missing, not JSON, or not an object."""
    text = header.get(key, default)
    if text is None:
        raise ValueError(f"{where}: the header has no {key}")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: {key} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key} is a JSON {type(value).__name__}, not an object")
    return value



def to_pixels(y: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] -> uint8 (B, H, W, 3), rounded as the palette decodes."""
    return torch.round(127.5 * (y.clamp(-1, 1) + 1)).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
