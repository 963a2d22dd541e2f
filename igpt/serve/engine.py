"""What the page computes, without the page: one loaded checkpoint, the images it is given (uploads as bytes,
drawings and dataset images as arrays, never a path from the client), and the completions, infills and
samples it draws, yielded as they grow so that the page can show them row by row.

Every image goes through the library's own steps: ``igpt.data.images`` decodes and resizes it exactly as the
data pipeline does, the checkpoint's tokenizer turns it into ids, ``igpt.generate`` samples (AR, with the KV
cache) or infills (BERT), and the tokenizer turns ids back into pixels. Kept ids are the original's, id for id.

Either tokenizer works. With a palette one id is one pixel, so the id grid (``n_px``) is the picture
(``side`` = ``n_px``). With a VQ-VAE one id is a code for a ``factor`` x ``factor`` patch: the picture is
``side`` = ``n_px * factor`` pixels on a side, rows of ids are kept, drawn and masked, and the pictures shown
are the VQ-VAE's decoding of the ids (so kept patches near a drawn one may change slightly: the decoder is
convolutional and sees its neighbours).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from igpt.config import PRESETS, EvalDataConfig, SampleConfig, ServeConfig
from igpt.config.fields import SEED_RANGE
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
class Picture:
    """A chosen picture as the model sees it: its ids (T,) int64 on the CPU, and their decoding (side, side, 3)
    uint8. The ids are kept beside the pixels because a VQ-VAE's encoding of its own decoding need not give
    the same codes back; completions keep these ids, code for code."""

    ids: torch.Tensor
    pixels: np.ndarray


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
        self.where, (self.model, self.tokenizer, self.record) = load_located(checkpoint, self.device)
        self.model.eval()
        self.dtype = resolve_dtype(sampling.dtype, self.device)
        # an AR model samples with its weights in the sampling dtype (bf16 on GPUs): cast once, not per request
        self.sampler_model = low_precision_copy(self.model, self.dtype) if self.can_sample else None
        self.n_px = self.model.config.n_px  # side of the id grid
        self.side = self.tokenizer.pixel_side(self.n_px)  # side of the pictures
        self.factor = self.side // self.n_px  # pixel rows per row of ids
        self.resize = data.resize
        self.data, self.split = None, None
        if data.data:
            self.data, self.split = open_eval(data.data, data.split, n_px=self.side, tokenizer=self.tokenizer,
                                              val_fraction=data.val_fraction, seed=data.split_seed,
                                              resize=data.resize, any_palette=data.any_palette)
            self.data_name = data.data

    # ---- what the model is

    @property
    def can_sample(self) -> bool:
        return self.record.reading.can_sample

    @property
    def is_palette(self) -> bool:
        return self.tokenizer.kind == "palette"

    @property
    def id_word(self) -> str:
        """What one id is, in the page's words."""
        return "pixel" if self.is_palette else "code"

    def card(self) -> dict[str, Any]:
        """The model card: preset, parameters, objective, step, tokenizer and validation loss when known."""
        c = self.record.model
        return {"checkpoint": str(self.where), "preset": preset_of(c), "n_layer": c.n_layer, "n_embd": c.n_embd,
                "n_head": c.n_head, "n_px": c.n_px, "params": sum(p.numel() for p in self.model.parameters()),
                "objective": self.record.objective, "step": self.record.step, "vocab_size": self.tokenizer.k,
                "tokenizer": self.tokenizer.kind, "side": self.side,
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
        """What each id looks like, as one picture (H, W, 3) uint8 in id order: a palette's colours, or each
        VQ-VAE code decoded from a grid filled with it alone (the centre patch, ``factor`` pixels on a side:
        a code's look depends on its neighbours, and this is its look among its own kind)."""
        if self.is_palette:
            tiles = self.tokenizer.decode(torch.arange(self.tokenizer.k)).numpy().reshape(-1, 1, 1, 3)  # (k, 1, 1, 3)
        else:
            f, mid = self.factor, self.n_px // 2 * self.factor
            T, k = self.n_px * self.n_px, self.tokenizer.k
            parts = []
            for c in range(0, k, 32):  # a few codes per pass: each is a whole picture (side, side) to the decoder
                codes = torch.arange(c, min(k, c + 32))[:, None].expand(-1, T)  # (b, T)
                parts.append(self.tokenizer.decode_images(codes).cpu().numpy()[:, mid:mid + f, mid:mid + f])
            tiles = np.concatenate(parts)  # (k, f, f, 3)
            scale = max(1, scale // f)
        return np.asarray(grid(tiles, ncol=ncol, scale=scale, pad=1))

    # ---- images in

    def decode_upload(self, data: bytes | None) -> Picture:
        """An uploaded file's bytes -> the picture as the model sees it. Refuses (ValueError, one line for the
        page) nothing, too much, or anything Pillow cannot read as an image."""
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

    def quantize(self, image: Image.Image | np.ndarray) -> Picture:
        """Any picture (a PIL image or uint8 (H, W[, 3|4]) array) as the model sees it: resized as the data
        pipeline does, then through the tokenizer."""
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 4:
            image = Image.fromarray(image, "RGBA")  # a drawing: transparency over white, as to_rgb does
        return self.picture(self.encode(to_n_px(image, self.side, self.resize)))

    def dataset_image(self, index: int) -> Picture:
        """Image ``index`` of the ``--data`` split as the model sees it."""
        if self.data is None:
            raise ValueError("No dataset was given to this page (start it with --data DATA).")
        if not 0 <= index < len(self.data):
            raise ValueError(f"The {self.split} split has images 0..{len(self.data) - 1}, not {index}.")
        ids = to_ids(self.data, np.array([index]), self.tokenizer, torch.device("cpu"))  # (1, T)
        return self.picture(ids[0])

    def picture(self, ids: torch.Tensor) -> Picture:
        """Ids (T,) -> the picture they make."""
        return Picture(ids.cpu(), self.decode(ids))

    def encode(self, pixels: np.ndarray) -> torch.Tensor:
        """Pixels (side, side, 3) uint8 -> ids (T,) on the CPU."""
        return self.tokenizer.encode(np.ascontiguousarray(pixels)[None]).reshape(-1)

    def decode(self, ids: torch.Tensor) -> np.ndarray:
        """Ids (..., T) -> pixels (..., side, side, 3) uint8."""
        ids = ids.cpu()
        images = self.tokenizer.decode_images(ids.reshape(-1, self.n_px * self.n_px))  # (B, side, side, 3)
        return images.reshape(*ids.shape[:-1], self.side, self.side, 3).numpy()

    # ---- images out, as they grow

    def _generator(self, seed: int) -> torch.Generator:
        return make_generator(seed, self.device)

    def _check_draw(self, draw: Draw) -> None:
        """The checks ``SampleConfig`` makes of its flags, in the words of the page's controls: a request
        reaches here from the page (or from Gradio's API for it), where ``--temperature`` means nothing."""
        if not 1 <= draw.n <= self.cfg.max_samples:
            raise ValueError(f"Choose 1..{self.cfg.max_samples} images, not {draw.n}.")
        if not (math.isfinite(draw.temperature) and draw.temperature >= 0):
            raise ValueError(f"Temperature must be a finite number >= 0 (0: always the likeliest), "
                             f"not {draw.temperature}.")
        if not draw.top_k >= 0:
            raise ValueError(f"Top-k must be >= 0 (0: no top-k filter), not {draw.top_k}.")
        low, high = SEED_RANGE
        if not low <= draw.seed < high:
            raise ValueError(f"Seed must be in {low}..{high - 1}, not {draw.seed}.")

    def _filters(self, draw: Draw) -> dict[str, Any]:
        return {"temperature": draw.temperature, "top_k": draw.top_k or None,
                "top_p": None if self.sampling.top_p >= 1.0 else self.sampling.top_p}

    def _rows(self, known: torch.Tensor, keep: torch.Tensor, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """Complete ids (n, T) where ``keep`` (n, T) is False: (rows of ids final, pixels (n, side, side, 3))."""
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

    def complete(self, picture: Picture, rows: int, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """Keep the top ``rows`` rows of the picture's ids and complete the rest ``draw.n`` times: yields (rows
        of ids final, completions (n, side, side, 3)) as they grow."""
        self._check_draw(draw)
        if not 0 <= rows <= self.n_px:
            raise ValueError(f"Keep 0..{self.n_px} rows, not {rows}.")
        known = picture.ids.expand(draw.n, -1).clone()  # (n, T)
        keep = torch.zeros_like(known, dtype=torch.bool)
        keep[:, :rows * self.n_px] = True
        yield from self._rows(known, keep, draw)

    def infill_mask(self, picture: Picture, mask: np.ndarray, draw: Draw) -> Iterator[tuple[int, np.ndarray]]:
        """Refill the picture's ids where ``mask`` (n_px, n_px) bool is True. A BERT model fills exactly the mask; an
        AR model, which reads left to right, refills everything from the mask's first id on (the page
        says so), since what it draws there can depend only on the ids before it."""
        self._check_draw(draw)
        if mask.shape != (self.n_px, self.n_px) or not mask.any():
            raise ValueError("Paint over the part of the image to fill in first.")
        known = picture.ids.expand(draw.n, -1).clone()  # (n, T)
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
        """Painted strokes (H, W) of any size over the displayed image -> bool (n_px, n_px) over the ids: an id
        (a pixel, or a VQ-VAE code's patch) is masked when strokes cover at least half of it (the area filter
        of the data pipeline's resize)."""
        cover = np.where(strokes > 0, 255, 0).astype(np.uint8)
        return to_n_px(cover, self.n_px, "squash")[..., 0] >= 128
