"""PNG figures (igpt.viz): crisp tiles placed where the table says, headers that never overlap, curves."""

from __future__ import annotations

import numpy as np
import pytest

from igpt.viz import completion_figure, curves_plot, enlarge, grid_table, hide_rows, tile_table

RNG = np.random.default_rng(0)


def _images(*shape) -> np.ndarray:
    return RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_tiles_are_pasted_unresampled_at_their_boxes():
    pixels = _images(5, 6, 6)
    table = grid_table(pixels, ncol=3, scale=3, title="five samples")
    assert [len(row) for row in table.boxes] == [3, 2]
    for i, img in enumerate(pixels):
        assert np.array_equal(table.cell(*divmod(i, 3)), img)
        top, left = table.boxes[i // 3][i % 3]
        block = np.asarray(table.image)[top:top + 18, left:left + 18]
        assert np.array_equal(block, enlarge(img, 3))  # every pixel a crisp 3x3 block, no smoothing
    assert table.boxes[0][0][0] > 10  # the title sits above the tiles


def test_headers_widen_narrow_columns_and_the_layout_ignores_the_titles_text():
    o, c = _images(2, 4, 4), _images(2, 3, 4, 4)
    fig = completion_figure(o, hide_rows(o, 2), c, scale=2, title="a")
    lefts = [left for _, left in fig.boxes[0]]
    assert all(b - a > 40 for a, b in zip(lefts, lefts[1:]))  # 8-pixel tiles in columns as wide as "completion k"
    wide = [left for _, left in completion_figure(o, o, c, scale=30).boxes[0]]  # tiles wider than any header
    # 120-pixel tiles 2 pixels apart, 10 more before the completions
    assert np.diff(wide).tolist() == [122, 132, 122, 122]
    assert np.array_equal(fig.cell(1, 4), c[1, 2]) and np.all(fig.cell(0, 1)[2:] == 128)
    longer = completion_figure(o, hide_rows(o, 2), c, scale=2, title="a much longer title than the other")
    assert longer.boxes == fig.boxes
    header_row = np.asarray(fig.image)[fig.boxes[0][0][0] - 12]
    assert (header_row < 128).any()  # header text is drawn above the tiles


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="--scale"):
        enlarge(_images(1, 2, 2), 0)
    with pytest.raises(ValueError, match="uint8"):
        tile_table([[np.zeros((4, 4, 3), np.float32)]])
    with pytest.raises(ValueError, match="completion_figure"):
        completion_figure(_images(2, 4, 4), _images(2, 4, 4), _images(3, 1, 4, 4))


def test_curves_add_an_accuracy_panel_when_records_hold_one():
    train = [{"split": "train", "step": s, "loss": 3.0 / s} for s in range(1, 20)]
    val = [{"split": "val", "step": s, "loss": 3.2 / s, "acc": 0.1 * s / 5} for s in (5, 10, 15)]
    loss_only, both = curves_plot(train + val[:0], "t"), curves_plot(train + val, "t")
    assert both.size[0] > loss_only.size[0] and both.size[1] == loss_only.size[1]
    pixels = np.asarray(both)
    assert (pixels[..., 0] > 150).sum() > 50 and ((pixels[..., 2] > 150) & (pixels[..., 0] < 100)).sum() > 50
