"""Single images (igpt.data.images): the box/bicubic resize, centre crop vs squash, every PIL mode to RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from igpt.data.images import load_image, to_n_px


def rand_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 noise: no symmetry, so any flip or transpose shows."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_box_downscale_gives_block_means():
    x = rand_images(1, 8, 8, 9)[0]
    out = to_n_px(x, 4, "squash")
    means = x.reshape(4, 2, 4, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(out - means).max() <= 1.0  # PIL rounds after each axis
    flat = np.repeat(np.repeat(x[:4, :4], 2, axis=0), 2, axis=1)  # constant 2x2 blocks
    assert np.array_equal(to_n_px(flat, 4, "center"), x[:4, :4])


def test_center_vs_squash():
    x = np.zeros((8, 16, 3), np.uint8)
    x[:, :4] = (255, 0, 0)
    x[:, 4:12] = (0, 255, 0)
    x[:, 12:] = (0, 0, 255)
    center, squash = to_n_px(x, 8, "center"), to_n_px(x, 8, "squash")
    assert (center == (0, 255, 0)).all()
    assert (squash[:, :2] == (255, 0, 0)).all() and (squash[:, 6:] == (0, 0, 255)).all()
    assert to_n_px(x, 16, "center").shape == (16, 16, 3)  # upscaling (bicubic)


def test_image_modes_to_rgb():
    grey16 = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert to_n_px(grey16, 1, "squash").shape == (1, 1, 3)
    assert to_n_px(grey16.resize((2, 2), Image.Resampling.NEAREST), 2, "center")[0, 1].tolist() == [255] * 3
    one = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert to_n_px(one, 2, "squash")[:, 1].tolist() == [[255] * 3, [255] * 3]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8)).resize((2, 2), Image.Resampling.NEAREST)
    assert to_n_px(la, 2, "center")[0].tolist() == [[255] * 3, [0] * 3]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8)).convert("P")
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.info["transparency"] = 0
    out = to_n_px(pal.resize((2, 2), Image.Resampling.NEAREST), 2, "center")
    assert out[0].tolist() == [[255] * 3, [40, 50, 60]]


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", 8)
    (tmp_path / "fake.jpg").write_text("hello")
    with pytest.raises(ValueError, match=r"fake\.jpg is not a readable image"):
        load_image(tmp_path / "fake.jpg", 8)
    Image.new("RGBA", (6, 4), (0, 0, 0, 0)).save(tmp_path / "ok.png")  # fully transparent: white
    assert (load_image(tmp_path / "ok.png", 4) == 255).all()
