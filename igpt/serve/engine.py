"""What the page computes, without the page: one loaded checkpoint, the images it is given (uploads as bytes,
drawings and dataset images as arrays, never a path from the client), and the completions, infills and
samples it draws, yielded as they grow so that the page can show them row by row.

Every image goes through the library's own steps: ``igpt.data.images`` decodes and resizes it exactly as the
data pipeline does, the checkpoint's palette quantizes it, ``igpt.generate`` samples (AR, with the KV cache)
or infills (BERT). Kept pixels are the quantized original, id for id.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from igpt.config import PRESETS, EvalDataConfig, SampleConfig, ServeConfig
from igpt.data.images import DECODE_ERRORS, to_n_px, to_rgb
from igpt.data.open import open_eval
from igpt.data.streams import to_ids
from igpt.generate.infill import infill
from igpt.generate.sample import low_precision_copy, make_generator, sample_rows
from igpt.runtime import resolve_device, resolve_dtype
from igpt.train.rundir import METRICS_FILE, read_metrics
from igpt.viz import grid
from igpt.weights.convert import load_located

UPLOAD_KINDS = "PNG, JPEG, GIF, BMP, WebP or TIFF"


@dataclass(frozen=True)
class Draw:
    """One request's sampling controls, as the page sends them."""

    n: int = 4  # completions or samples
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int = 0


def preset_of(cfg: Any) -> str:
    """The preset whose shape the model has, or "custom"."""
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "n_px")}
    return next((name for name, p in PRESETS.items() if p == shape), "custom")


class Engine:
    """A checkpoint ready to complete, infill and sample for the page."""

    def __init__(self, checkpoint: str | Path, cfg: ServeConfig = ServeConfig(),
                 sampling: SampleConfig = SampleConfig(), data: EvalDataConfig = EvalDataConfig()) -> None:
        self.cfg, self.sampling = cfg, sampling
        self.device = resolve_device(sampling.device)
        self.where, (self.model, self.palette, self.record) = load_located(checkpoint, self.device)
        if self.palette.kind != "palette":  # the page keeps, masks and draws rows of pixels, one id each
            raise ValueError(f"--checkpoint {checkpoint}: igpt serve edits palette models pixel by pixel; this "
                             f"model's ids are codes of its VQ-VAE tokenizer ({self.palette.describe()}); use "
                             "igpt sample and igpt complete, which decode codes to images")
        self.model.eval()
        self.dtype = resolve_dtype(sampling.dtype, self.device)
        # an AR model samples with its weights in the sampling dtype (bf16 on GPUs): cast once, not per request
        self.sampler_model = low_precision_copy(self.model, self.dtype) if self.can_sample else None
        self.n_px = self.model.config.n_px
        self.resize = data.resize
        self.data, self.split = None, None
        if data.data:
            self.data, self.split = open_eval(data.data, data.split, n_px=self.n_px, palette=self.palette,
                                              val_fraction=data.val_fraction, seed=data.split_seed,
                                              resize=data.resize, any_palette=data.any_palette)
            self.data_name = data.data

    # ---- what the model is

    @property
    def can_sample(self) -> bool:
        return self.record.reading.can_sample

    def card(self) -> dict[str, Any]:
        """The model card: preset, parameters, objective, step, palette and validation loss when known."""
        c = self.record.model
        return {"checkpoint": str(self.where), "preset": preset_of(c), "n_layer": c.n_layer, "n_embd": c.n_embd,
                "n_head": c.n_head, "n_px": c.n_px, "params": sum(p.numel() for p in self.model.parameters()),
                "objective": self.record.objective, "step": self.record.step, "palette_k": self.palette.k,
                "val": self.val_loss(), "source": (self.record.source or {}).get("format"),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    def val_loss(self) -> dict[str, float] | None:
        """The validation record logged at the checkpoint's step (or the last before it) by the run that wrote
        it, when the checkpoint sits in a run directory: ``{"step", "loss", ...}``."""
        run = self.where.parent.parent
        if self.record.step is None or not (run / METRICS_FILE).is_file():
            return None
        try:
            records = read_metrics(run)
        except ValueError:
            return None  # a damaged log takes nothing from the page but this line of the card
        found = [r for r in records if r.get("split") == "val" and r["step"] <= self.record.step]
        return {k: v for k, v in found[-1].items() if k != "split"} if found else None

    def swatch(self, ncol: int = 32, scale: int = 16) -> np.ndarray:
        """The palette's colours as one picture (H, W, 3) uint8, in id order."""
        colours = self.palette.decode(torch.arange(self.palette.k)).numpy()  # (k, 3) uint8
        return np.asarray(grid(colours.reshape(-1, 1, 1, 3), ncol=ncol, scale=scale, pad=1))

    # ---- images in

    def decode_upload(self, data: bytes | None) -> np.ndarray:
        """An uploaded file's bytes -> pixels (n_px, n_px, 3) uint8, quantized. Refuses (ValueError, one line
        for the page) nothing, too much, or anything Pillow cannot read as an image."""
        if not data:
            raise ValueError("The upload is empty: choose an image file.")
        if len(data) > self.cfg.max_upload_bytes:
            raise ValueError(f"The upload is {len(data) / 1e6:.1f} MB; this page accepts images up to "
                             f"{self.cfg.max_upload_mb:g} MB.")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = to_rgb(ImageOps.exif_transpose(img))  # decodes the whole file, as open_image does
        except UnidentifiedImageError:  # its message names the in-memory buffer, which says nothing here
            raise ValueError(f"The upload is not an image ({UPLOAD_KINDS} expected).") from None
        except DECODE_ERRORS as e:  # a damaged file, a decompression bomb, ...
            raise ValueError(f"The upload could not be read as an image: {e}") from None
        return self.quantize(img)

    def quantize(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Any picture (a PIL image or uint8 (H, W[, 3|4]) array) -> (n_px, n_px, 3) uint8 as the model sees it:
        resized as the data pipeline does, then through the palette."""
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 4:
            image = Image.fromarray(image, "RGBA")  # a drawing: transparency over white, as to_rgb does
        pixels = to_n_px(image, self.n_px, self.resize)
        return self.decode(self.encode(pixels))

    def dataset_image(self, index: int) -> np.ndarray:
        """Image ``index`` of the ``--data`` split, quantized (n_px, n_px, 3)."""
        if self.data is None:
            raise ValueError("No dataset was given to this page (start it with --data DATA).")
        if not 0 <= index < len(self.data):
            raise ValueError(f"The {self.split} split has images 0..{len(self.data) - 1}, not {index}.")
        ids = to_ids(self.data, np.array([index]), self.palette, torch.device("cpu"))  # (1, T)
        return self.decode(ids[0])

    def encode(self, pixels: np.ndarray) -> torch.Tensor:
        """Pixels (n_px, n_px, 3) uint8 -> ids (T,) on the CPU."""
        return self.palette.encode(pixels).reshape(-1)

    def decode(self, ids: torch.Tensor) -> np.ndarray:
        """Ids (..., T) -> pixels (..., n_px, n_px, 3) uint8."""
        ids = ids.cpu()
        return self.palette.decode(ids).reshape(*ids.shape[:-1], self.n_px, self.n_px, 3).numpy()

    # ---- images out, as they grow

    def _generator(self, seed: int) -> torch.Generator:
        return make_generator(seed, self.device)

    def _check_draw(self, draw: Draw) -> None:
        if not 1 <= draw.n <= self.cfg.max_samples:
            raise ValueError(f"Choose 1..{self.cfg.max_samples} images, not {draw.n}.")
        if draw.temperature < 0 or draw.top_k < 0:
            raise ValueError("Temperature and top-k must be >= 0.")
        SampleConfig(temperature=draw.temperature, top_k=draw.top_k, seed=draw.seed)  # the CLI's checks

    def _filters(self, draw: Draw) -> dict[str, Any]:
        return {"temperature": draw.temperature, "top_k": draw.top_k or None,
                "top_p": None if self.sampling.top_p >= 1.0 else self.sampling.top_p}

    def _rows(self, known: torch.Tensor, keep: torch.Tensor, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """Complete ids (n, T) where ``keep`` (n, T) is False: (rows final, pixels (n, n_px, n_px, 3))."""
        T = self.n_px * self.n_px
        if self.can_sample:
            # the first position to fill is the first one not kept: everything after it is drawn
            free = (~keep[0]).nonzero()
            start = int(free[0]) if len(free) else T
            prefix = known[:, :start].to(self.device)
            for rows, ids in sample_rows(self.sampler_model, len(known), prefix=prefix,
                                         generator=self._generator(draw.seed),
                                         dtype=self.dtype, window=self.sampling.window,
                                         cuda_graph=self.sampling.cuda_graph and self.device.type == "cuda",
                                         **self._filters(draw)):
                yield rows, self.decode(ids)
            return
        ids = infill(self.model, known, keep, rounds=self.cfg.rounds, generator=self._generator(draw.seed),
                     dtype=self.dtype, **self._filters(draw))
        yield self.n_px, self.decode(ids)

    def complete(self, pixels: np.ndarray, rows: int, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """Keep the top ``rows`` of quantized ``pixels`` (n_px, n_px, 3) and complete the rest ``draw.n`` times:
        yields (rows final, completions (n, n_px, n_px, 3)) as they grow."""
        self._check_draw(draw)
        if not 0 <= rows <= self.n_px:
            raise ValueError(f"Keep 0..{self.n_px} rows, not {rows}.")
        known = self.encode(pixels).expand(draw.n, -1).clone()  # (n, T)
        keep = torch.zeros_like(known, dtype=torch.bool)
        keep[:, :rows * self.n_px] = True
        yield from self._rows(known, keep, draw)

    def infill_mask(self, pixels: np.ndarray, mask: np.ndarray, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """Refill the pixels where ``mask`` (n_px, n_px) bool is True. A BERT model fills exactly the mask; an
        AR model, which reads left to right, refills everything from the mask's first pixel on (the page
        says so), since what it draws there can depend only on the pixels before it."""
        self._check_draw(draw)
        if mask.shape != (self.n_px, self.n_px) or not mask.any():
            raise ValueError("Paint over the part of the image to fill in first.")
        known = self.encode(pixels).expand(draw.n, -1).clone()  # (n, T)
        keep = torch.from_numpy(~mask.reshape(-1)).expand(draw.n, -1).clone()
        if self.can_sample:
            keep[:, int(np.flatnonzero(mask.reshape(-1))[0]):] = False
        yield from self._rows(known, keep, draw)

    def sample(self, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """``draw.n`` unconditional samples (AR checkpoints only), row by row."""
        self._check_draw(draw)
        if not self.can_sample:
            raise ValueError("This is a BERT checkpoint: it cannot draw images from nothing, only fill in "
                             "masked parts of one (the Infill tab).")
        known = torch.zeros(draw.n, self.n_px * self.n_px, dtype=torch.long)
        yield from self._rows(known, torch.zeros_like(known, dtype=torch.bool), draw)

    def mask_from_strokes(self, strokes: np.ndarray) -> np.ndarray:
        """Painted strokes (H, W) of any size over the displayed image -> bool (n_px, n_px): a pixel is masked
        when strokes cover at least half of it (the area filter of the data pipeline's resize)."""
        cover = np.where(strokes > 0, 255, 0).astype(np.uint8)
        return to_n_px(cover, self.n_px, "squash")[..., 0] >= 128
