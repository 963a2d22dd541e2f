"""PNG outputs people would rather see than read: image tables with headers, sample grids and training curves
(probe plots, accuracy against layer, are ``igpt.eval.plots``).

Everything is drawn with matplotlib on its Agg canvas (``Figure`` + ``FigureCanvasAgg``: no pyplot, no backend
switch, nothing global). Image tiles are pasted pixel for pixel with ``figimage`` (never resampled) after a
nearest-neighbour enlargement by ``scale``, so palette colours stay crisp; matplotlib adds only the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from igpt.atomic import replacing

DPI = 100
# The largest picture igpt writes, checked before the work that fills it (``check_picture``). Agg, which
# draws every figure, refuses a side of 2**16 pixels or more. Pillow, which reads PNGs back (igpt, and most
# viewers built on it), calls a picture of more than Image.MAX_IMAGE_PIXELS (its default, ~89 Mpx) a
# decompression bomb: it warns, and refuses past twice that. Drawing one holds ~10 bytes a pixel (the canvas,
# Agg's RGBA buffer, the PNG's copy), so a picture at the limit needs under 1 GB; a grid at the limit also
# bounds the images tiled in it (~270 MB of RGB at most).
MAX_SIDE = 2**16 - 1
MAX_PIXELS = 89_478_485
FONT_PT = 10  # header text; at DPI 100 a line is ~14 pixels high
TITLE_PT = 11


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write atomically: a temp file then a rename, so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Images (..., H, W, 3) each pixel repeated ``scale`` times both ways (nearest neighbour)."""
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    return np.asarray(pixels).repeat(scale, axis=-3).repeat(scale, axis=-2)


def _text_px(text: str, pt: float, weight: str = "normal") -> tuple[int, int]:
    """(width, line height) in pixels of ``text`` set in matplotlib's default font at ``pt`` points. The
    height is that of "Ag" whatever the text, so a layout depends on the lengths of its texts only."""
    # matplotlib is imported where a picture is drawn: it takes a second, which sampling, loading weights and
    # every command that imports this module for its sizes would otherwise pay
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer, font = RendererAgg(1, 1, DPI), FontProperties(size=pt, weight=weight)
    w, _, _ = renderer.get_text_width_height_descent(text, font, ismath=False)
    _, h, _ = renderer.get_text_width_height_descent("Ag", font, ismath=False)
    return int(np.ceil(w)), int(np.ceil(h))


def _render(canvas: np.ndarray, texts: list[tuple[float, float, str, float, str]]) -> Image.Image:
    """The canvas (H, W, 3) uint8, pasted unresampled, with ``texts`` (x, y from the top-left in pixels,
    string, points, weight) centred on their points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    H, W, _ = canvas.shape
    fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI, facecolor="white")
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    for x, y, text, pt, weight in texts:
        fig.text(x / W, 1 - y / H, text, ha="center", va="center", fontsize=pt, fontweight=weight)
    agg = FigureCanvasAgg(fig)
    agg.draw()
    return Image.fromarray(np.asarray(agg.buffer_rgba())[..., :3].copy())


@dataclass(frozen=True)
class TileTable:
    """A rendered table of image tiles: the picture and where each tile's top-left pixel lies (``boxes[r][c]``
    is (top, left), or None for an empty cell)."""

    image: Image.Image
    boxes: tuple[tuple[tuple[int, int] | None, ...], ...]
    tile: tuple[int, int]  # (h, w) of one tile before enlargement
    scale: int

    def cell(self, r: int, c: int, image: Image.Image | np.ndarray | None = None) -> np.ndarray:
        """Tile (r, c) back at its own size (h, w, 3) uint8, cut from this table's picture (or from ``image``,
        the same picture read back from a file)."""
        top, left = self.boxes[r][c]
        h, w = self.tile
        arr = np.asarray(self.image if image is None else image)[..., :3]
        return arr[top:top + h * self.scale:self.scale, left:left + w * self.scale:self.scale].copy()


def tile_table(rows: Sequence[Sequence[np.ndarray | None]], *, scale: int = 4, headers: Sequence[str] | None = None,
               title: str | None = None, gap_before: Sequence[int] = (), pad: int = 2, gap: int = 10) -> TileTable:
    """Images (h, w, 3) uint8 laid out in rows, each enlarged ``scale`` times, under optional column
    ``headers`` and a ``title``; ``gap_before`` lists the columns preceded by a wider ``gap``. A column is as
    wide as its tile or its header, whichever is wider, so a header never overlaps its neighbour. Where the
    tiles lie depends on the shapes, ``scale``, the headers and whether there is a title, not on its text."""
    tiles = [np.asarray(t) for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("tile_table needs at least one image")
    h, w = tiles[0].shape[:2]
    for t in tiles:
        if t.dtype != np.uint8 or t.shape != (h, w, 3):
            raise ValueError(f"tile_table expects uint8 ({h}, {w}, 3) images, got {t.dtype} {t.shape}")
    ncol = max(len(row) for row in rows)
    th, tw = h * scale, w * scale
    col_w = [tw] * ncol
    header_h = 0
    if headers:
        for c, text in enumerate(headers[:ncol]):
            text_w, text_h = _text_px(text, FONT_PT)
            col_w[c] = max(tw, text_w + 6)
            header_h = max(header_h, text_h + 8)
    lefts, x = [], pad
    for c in range(ncol):
        x += gap if c in gap_before else 0
        lefts.append(x)
        x += col_w[c] + pad
    width = x
    title_h = 0
    if title:
        title_w, text_h = _text_px(title, TITLE_PT, "bold")
        title_h = text_h + 10
        width = max(width, title_w + 12)
    top0 = title_h + header_h + pad
    height = top0 + len(rows) * (th + pad)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    boxes = []
    for r, row in enumerate(rows):
        top, line = top0 + r * (th + pad), []
        for c, img in enumerate(row):
            if img is None:
                line.append(None)
                continue
            left = lefts[c] + (col_w[c] - tw) // 2
            canvas[top:top + th, left:left + tw] = enlarge(img, scale)
            line.append((top, left))
        boxes.append(tuple(line))
    texts = []
    if title:
        texts.append((width / 2, title_h / 2, title, TITLE_PT, "bold"))
    for c, text in enumerate((headers or [])[:ncol]):
        texts.append((lefts[c] + col_w[c] / 2, title_h + header_h / 2, text, FONT_PT, "normal"))
    return TileTable(_render(canvas, texts), tuple(boxes), (h, w), scale)


def table_size(n_rows: int, n_cols: int, tile: tuple[int, int], *, scale: int, pad: int = 2, gaps: int = 0,
               gap: int = 10, widest_header: str | None = None, title: str | None = None) -> tuple[int, int]:
    """(height, width) in pixels of the ``tile_table`` of ``n_rows`` rows of ``n_cols`` tiles (h, w) with
    ``gaps`` wide gaps, at most (every column is taken as wide as ``widest_header``). Arithmetic and two text
    measurements, whatever the counts: a picture too large to draw is refused before the work that fills it."""
    th, tw = tile[0] * scale, tile[1] * scale
    col_w, header_h, title_h = tw, 0, 0
    if widest_header:
        text_w, text_h = _text_px(widest_header, FONT_PT)
        col_w, header_h = max(tw, text_w + 6), text_h + 8
    width = pad + n_cols * (col_w + pad) + gaps * gap
    if title:
        title_w, text_h = _text_px(title, TITLE_PT, "bold")
        title_h, width = text_h + 10, max(width, title_w + 12)
    return title_h + header_h + pad + n_rows * (th + pad), width


def check_picture(size: tuple[int, int], what: str, flags: str) -> None:
    """Refuse, naming ``flags``, a picture of ``size`` (height, width) larger than ``MAX_SIDE`` a side or
    ``MAX_PIXELS`` in all."""
    h, w = size
    if max(h, w) > MAX_SIDE or h * w > MAX_PIXELS:
        raise ValueError(f"{flags}: {what} would be {w}x{h} pixels; a picture igpt writes is at most {MAX_SIDE} "
                         f"pixels a side and {MAX_PIXELS / 1e6:.0f} million pixels in all")


def grid_table(pixels: np.ndarray, ncol: int = 8, scale: int = 1, pad: int = 1, title: str | None = None) -> TileTable:
    """Images (N, H, W, 3) uint8 tiled ``ncol`` to a row, each enlarged ``scale`` times, under a ``title``."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"grid expects uint8 (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
    ncol = max(1, min(ncol, len(pixels)))
    rows = [list(pixels[i:i + ncol]) for i in range(0, len(pixels), ncol)]
    return tile_table(rows, scale=scale, title=title, pad=pad)


def grid(pixels: np.ndarray, ncol: int = 8, scale: int = 1, pad: int = 1, title: str | None = None) -> Image.Image:
    """The picture of ``grid_table``."""
    return grid_table(pixels, ncol, scale, pad, title).image


def hide_rows(pixels: np.ndarray, rows: int, fill: int = 128) -> np.ndarray:
    """A copy of images (..., H, W, 3) with every row from ``rows`` on painted ``fill`` (the part a
    completion has to invent)."""
    out = np.array(pixels, copy=True)
    out[..., rows:, :, :] = fill
    return out


def completion_figure(originals: np.ndarray, kept: np.ndarray, completions: np.ndarray, scale: int = 4,
                      title: str | None = None) -> TileTable:
    """The paper's completion figure: one row per input, holding the quantized original, the kept rows (the
    rest grey) and then, after a gap, the N completions, under the headers "original", "kept rows",
    "completion 1".."completion N". originals and kept are uint8 (M, H, W, 3), completions (M, N, H, W, 3)."""
    originals, kept, completions = (np.asarray(a) for a in (originals, kept, completions))
    if completions.ndim != 5 or originals.shape != kept.shape or originals.shape != (
            completions.shape[:1] + completions.shape[2:]):
        raise ValueError(f"completion_figure expects (M, H, W, 3), (M, H, W, 3) and (M, N, H, W, 3), got "
                         f"{originals.shape}, {kept.shape} and {completions.shape}")
    n = completions.shape[1]
    rows = [[originals[r], kept[r], *completions[r]] for r in range(len(originals))]
    headers = ["original", "kept rows"] + [f"completion {k}" for k in range(1, n + 1)]
    return tile_table(rows, scale=scale, headers=headers, title=title, gap_before=(2,))


def curves_plot(records: Sequence[dict[str, Any]], title: str, loss_label: str = "loss (nats)") -> Image.Image:
    """Training curves from metrics records (``igpt.train.rundir`` schema): loss against step for each
    split, and a second panel of validation accuracy when the records hold ``acc``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = {}
    for rec in records:
        if isinstance(rec.get("loss"), (int, float)):
            splits.setdefault(rec["split"], []).append((rec["step"], rec["loss"]))
    acc = [(rec["step"], rec["acc"]) for rec in records if isinstance(rec.get("acc"), (int, float))]
    fig = Figure(figsize=(10 if acc else 6.4, 4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2 if acc else 1, squeeze=False)[0]
    styles = {"train": dict(color="tab:blue", lw=1.2), "val": dict(color="tab:orange", lw=1.8, marker="o", ms=4)}
    for split, points in splits.items():
        steps, values = zip(*points)
        axes[0].plot(steps, values, label=split, **styles.get(split, {}))
    axes[0].set(xlabel="step", ylabel=loss_label, title="loss" if acc else "")
    if splits:
        axes[0].legend(loc="upper right", frameon=False)
    if acc:
        steps, values = zip(*acc)
        axes[1].plot(steps, values, color="tab:green", marker="o", ms=4, label="validation accuracy")
        best = int(np.argmax(values))
        axes[1].plot([steps[best]], [values[best]], marker="*", ms=12, color="tab:red", ls="none",
                     label=f"best: {values[best]:.3f} at step {steps[best]}")
        axes[1].legend(loc="best", frameon=False)
        axes[1].set(xlabel="step", ylabel="accuracy", title="validation accuracy")
        axes[1].margins(y=0.15)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    agg = FigureCanvasAgg(fig)
    agg.draw()
    return Image.fromarray(np.asarray(agg.buffer_rgba())[..., :3].copy())
