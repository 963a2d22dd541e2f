"""The prepared cache and the splits (igpt.data.cache), on tiny files made in tmp_path. The readers of each
format are in test_sources.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_openai

from igpt.data import cache as data_mod
from igpt.data.imageset import ImageSet, check_ids as check_palette
from igpt.data.open import open_split, prepare
from igpt.data.splits import split_indices
from igpt.tokenizers import Palette

from conftest import read_source

SHARED_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-small.npz"


class TinyPalette:
    """Nearest-centre quantizer with the Palette interface (kind, encode, fingerprint, describe), independent of
    igpt.tokenizers.palette."""

    kind = "palette"

    def __init__(self, k: int, seed: int) -> None:
        self.centers = np.random.default_rng(seed).uniform(-1, 1, (k, 3))  # (K, 3) in [-1, 1]
        self.seed = seed

    def encode(self, pixels: np.ndarray):
        import torch

        x = np.asarray(pixels, np.float64) / 127.5 - 1.0  # (..., 3)
        d = ((x[..., None, :] - self.centers) ** 2).sum(-1)  # (..., K)
        return torch.from_numpy(d.argmin(-1).astype(np.int64))

    def fingerprint(self) -> str:
        return f"tiny-{len(self.centers)}-{self.seed}"

    def describe(self) -> str:
        return self.fingerprint()

    @property
    def k(self) -> int:
        return len(self.centers)


# ---------------------------------------------------------------------------------------------- fixtures



def test_split_indices_properties():
    tr, va = split_indices(20, 0.1, 0)
    assert len(va) == 2 and not set(tr) & set(va) and sorted([*tr, *va]) == list(range(20))
    assert np.array_equal(va, split_indices(20, 0.1, 0)[1])
    assert not np.array_equal(va, split_indices(20, 0.1, 1)[1])
    assert len(split_indices(5, 0.01, 0)[1]) == 1 and len(split_indices(1, 0.5, 0)[1]) == 0
    with pytest.raises(ValueError, match="val-fraction"):
        split_indices(10, 1.0, 0)


def test_open_split_val_carving(npz_file):
    path, arrays = npz_file
    kw = dict(n_px=8, val_fraction=0.25, seed=3)
    train, val, full = (open_split(str(path), s, **kw) for s in ("train", "val", "train_all"))
    assert len(val) == 5 and len(train) == 15 and len(full) == 20
    rows = {r.tobytes() for r in full.pixels}
    assert {r.tobytes() for r in train.pixels} | {r.tobytes() for r in val.pixels} == rows
    assert not {r.tobytes() for r in train.pixels} & {r.tobytes() for r in val.pixels}
    assert np.array_equal(full.pixels, arrays["x_train"])
    assert np.array_equal(open_split(str(path), "val", **kw).pixels, val.pixels)
    other = open_split(str(path), "val", n_px=8, val_fraction=0.25, seed=4)
    assert not np.array_equal(other.pixels, val.pixels)
    with pytest.raises(ValueError, match=r"'val'.*val_fraction is 0"):
        open_split(str(path), "val", n_px=8, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"tiny\.npz.*'unlabeled'.*available: test, train, train_all, val"):
        open_split(str(path), "unlabeled", n_px=8)
    with pytest.raises(ValueError, match="unknown split"):
        open_split(str(path), "dev", n_px=8)


def assert_same(a: ImageSet, b: ImageSet) -> None:
    for field in ("pixels", "ids", "labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), field
    assert a.n_px == b.n_px and a.classes == b.classes


def test_prepare_roundtrip_pixels(npz_file, tmp_path):
    path, _ = npz_file
    meta = prepare(str(path), str(tmp_path / "cache"), n_px=8, val_fraction=0.2, seed=1, progress=False)
    assert meta["kind"] == "pixels" and meta["splits"]["val"] == {"n": 4, "labeled": True}
    assert json.loads((tmp_path / "cache" / "meta.json").read_text()) == meta
    for split in ("train", "val", "test", "train_all"):
        cached = open_split(str(tmp_path / "cache"), split, n_px=8)
        assert_same(cached, open_split(str(path), split, n_px=8, val_fraction=0.2, seed=1))
    assert isinstance(open_split(str(tmp_path / "cache"), "train", n_px=8).pixels, np.memmap)
    with pytest.raises(ValueError, match=r"prepared at 8x8, but 16x16 .*--n-px 16"):
        open_split(str(tmp_path / "cache"), "train", n_px=16)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_prepare_roundtrip_ids(npz_file, tmp_path):
    path, _ = npz_file
    palette = TinyPalette(8, seed=0)
    meta = prepare(str(path), str(tmp_path / "cache"), n_px=4, tokenizer=palette, progress=False)
    assert meta["kind"] == "ids" and meta["tokenizer_fingerprint"] == palette.fingerprint()
    for split in ("train", "val", "train_all"):
        cached = open_split(str(tmp_path / "cache"), split, n_px=4)
        direct = open_split(str(path), split, n_px=4)
        want = palette.encode(direct.pixels).numpy().reshape(len(direct), 16)
        assert cached.ids.dtype == np.uint16 and np.array_equal(cached.ids, want)
        assert np.array_equal(cached.labels, direct.labels) and cached.pixels is None
    check_palette(cached, palette)
    with pytest.raises(ValueError, match=r"cache.*tiny-8-0.*tiny-8-1"):
        check_palette(cached, TinyPalette(8, seed=1))


def test_prepare_openai_and_real_palette(tmp_path):
    write_openai(tmp_path / "cifar10", {"tr": 6, "te": 2}, t=16)
    meta = prepare(str(tmp_path / "cifar10"), str(tmp_path / "cache"), n_px=4, val_fraction=0.5, progress=False)
    assert meta["kind"] == "ids" and meta["tokenizer_fingerprint"] is None
    for split in ("train", "val", "test", "train_all"):
        assert_same(open_split(str(tmp_path / "cache"), split, n_px=4),
                    open_split(str(tmp_path / "cifar10"), split, n_px=4, val_fraction=0.5))
    ids = open_split(str(tmp_path / "cache"), "train", n_px=4)
    # OpenAI ids carry no fingerprint: their range is checked, and the palette must be OpenAI's (512 colours,
    # no fit metadata) unless the caller accepts any palette
    openai = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    check_palette(ids, openai)
    with pytest.raises(ValueError, match=r"past the 4 colours \(ids 0..3\)"):
        check_palette(ids, Palette(np.random.default_rng(0).uniform(-1, 1, (4, 3))), any_palette=True)
    fitted = Palette(openai.centers)
    fitted.meta = {"k": 512}
    with pytest.raises(ValueError, match="not OpenAI's kmeans_centers.npy: it has 512 colours and was fitted"):
        check_palette(ids, fitted)
    check_palette(ids, fitted, any_palette=True)
    meta = prepare(str(tmp_path / "cifar10"), str(tmp_path / "c2"), n_px=4, tokenizer=openai, progress=False)
    assert meta["tokenizer_fingerprint"] == openai.fingerprint()
    with pytest.raises(ValueError, match="--any-palette"):
        prepare(str(tmp_path / "cifar10"), str(tmp_path / "c3"), n_px=4, tokenizer=fitted, progress=False)
    assert not (tmp_path / "c3").exists()


def test_meta_json_written_last(npz_file, tmp_path, monkeypatch):
    path, _ = npz_file
    out = tmp_path / "cache"
    prepare(str(path), str(out), n_px=8, progress=False)
    assert (out / "meta.json").is_file()
    real, calls = data_mod._write_array, []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_write_array", failing)
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        prepare(str(path), str(out), n_px=8, progress=False)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(str(path), str(out), n_px=8, overwrite=True, progress=False)
    assert not (out / "meta.json").exists()  # the old, now inconsistent meta.json is gone too
    with pytest.raises(ValueError, match="accepted"):
        open_split(str(out), "train", n_px=8)
    prepare(str(path), str(out), n_px=8, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="already a prepared cache"):
        prepare(str(out), str(tmp_path / "again"), n_px=8, progress=False)


def test_bad_options(npz_file):
    path, _ = npz_file
    with pytest.raises(ValueError, match="--on-error"):
        read_source(str(path), 8, on_error="ignore")
    with pytest.raises(ValueError, match="--resize"):
        open_split(str(path), "train", n_px=8, resize="fit")
    with pytest.raises(ValueError, match="--val-fraction"):
        open_split(str(path), "train", n_px=8, val_fraction=-0.1)


def test_cifar10_small_shared():
    if not SHARED_SMALL.is_file():
        pytest.skip(f"{SHARED_SMALL} is not present (the shared data folder sits beside the repository)")
    val = open_split(str(SHARED_SMALL), "val", n_px=32)
    test = open_split(str(SHARED_SMALL), "test", n_px=32)
    assert len(val) == 800 and val.pixels.shape == (800, 32, 32, 3) and val.pixels.dtype == np.uint8
    assert len(test) == 2000 and test.classes[0] == "airplane" and set(test.labels.tolist()) == set(range(10))
