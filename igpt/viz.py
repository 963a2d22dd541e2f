"""PNG outputs people would rather see than read: image grids and accuracy-per-layer plots (Pillow only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from igpt.atomic import replacing


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write atomically: a temp file then a rename, so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def grid(pixels: np.ndarray, ncol: int = 8, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images (N, H, W, 3) uint8 into one picture, each enlarged ``scale`` times (nearest neighbour,
    so palette colours stay crisp) with a ``pad``-pixel white border between them."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"grid expects uint8 (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
    n, h, w, _ = pixels.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    big = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    H, W = h * scale + pad, w * scale + pad
    canvas = np.full((nrow * H + pad, ncol * W + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[pad + r * H: pad + r * H + h * scale, pad + c * W: pad + c * W + w * scale] = big[i]
    return Image.fromarray(canvas)


def layer_plot(accs: dict[int, float], title: str, baseline: dict[int, float] | None = None,
               size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Accuracy against layer: a blue line for ``accs``, grey for ``baseline`` (e.g. random init)."""
    W, H = size
    left, right, top, bottom = 50, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    layers = sorted(accs)
    lo, hi = min(layers), max(max(layers), min(layers) + 1)
    x = lambda l: left + (l - lo) / (hi - lo) * (W - left - right)  # noqa: E731
    y = lambda a: top + (1 - a) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([left - 4, y(a), left, y(a)], fill="black")
        d.text((5, y(a) - 6), f"{a:.2f}", fill="black")
    for l in layers:
        d.text((x(l) - 3, H - bottom + 6), str(l), fill="black")
    for series, colour in ((baseline, (160, 160, 160)), (accs, (30, 90, 200))):
        if series:
            pts = [(x(l), y(series[l])) for l in sorted(series)]
            d.line(pts, fill=colour, width=2)
            for px, py in pts:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    d.text((left, 8), title, fill="black")
    d.text((W // 2 - 20, H - 18), "layer", fill="black")
    return img


def hide_rows(pixels: np.ndarray, rows: int, fill: int = 128) -> np.ndarray:
    """A copy of images (..., H, W, 3) with every row from ``rows`` on painted ``fill`` (the part a
    completion has to invent)."""
    out = np.array(pixels, copy=True)
    out[..., rows:, :, :] = fill
    return out


def completion_figure(originals: np.ndarray, kept: np.ndarray, completions: np.ndarray, scale: int = 4,
                      pad: int = 2, gap: int = 8) -> Image.Image:
    """The paper's completion figure: one row per input, holding the quantized original, the kept part
    (the rest grey) and then, after a wider ``gap``, the N completions. originals and kept are uint8
    (M, H, W, 3), completions (M, N, H, W, 3)."""
    originals, kept, completions = (np.asarray(a) for a in (originals, kept, completions))
    if completions.ndim != 5 or originals.shape != kept.shape or originals.shape != (
            completions.shape[:1] + completions.shape[2:]):
        raise ValueError(f"completion_figure expects (M, H, W, 3), (M, H, W, 3) and (M, N, H, W, 3), got "
                         f"{originals.shape}, {kept.shape} and {completions.shape}")
    m, n, h, w, _ = completions.shape
    cell_h, cell_w = h * scale, w * scale
    width = pad + (2 + n) * (cell_w + pad) + gap
    canvas = np.full((pad + m * (cell_h + pad), width, 3), 255, dtype=np.uint8)
    for r in range(m):
        top = pad + r * (cell_h + pad)
        row = [originals[r], kept[r], *completions[r]]
        for c, img in enumerate(row):
            left = pad + c * (cell_w + pad) + (gap if c >= 2 else 0)
            canvas[top:top + cell_h, left:left + cell_w] = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(canvas)
