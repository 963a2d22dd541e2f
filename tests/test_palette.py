"""Tests for igpt.tokenizers.palette: the quantisation formulas, k-means fitting, file formats and fingerprints."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from igpt.data.imageset import ImageSet, check_ids
from igpt.tokenizers.kmeans import assign, lloyd
from igpt.tokenizers import Palette
from igpt.tokenizers.palette import _normalise


def _grid_colours(step: int = 40) -> np.ndarray:
    """Distinct uint8 colours on a grid `step` apart: (n, 3)."""
    levels = np.arange(10, 256, step, dtype=np.uint8)
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)


def _exact_palette(colours: np.ndarray) -> Palette:
    """A palette whose centres decode exactly to the given uint8 colours."""
    return Palette(colours.astype(np.float32) / 127.5 - 1)


def _blobs(rng: np.random.Generator, centres: np.ndarray, per_blob: int, spread: int) -> np.ndarray:
    """uint8 pixels (len(centres), per_blob, 3) scattered within +-spread of each centre colour."""
    noise = rng.integers(-spread, spread + 1, size=(len(centres), per_blob, 3))
    return np.clip(centres[:, None, :].astype(int) + noise, 0, 255).astype(np.uint8)


# --- encode / decode ---------------------------------------------------------------------------------


def test_encode_of_each_decoded_centre_is_its_own_id():
    colours = _grid_colours()  # (343, 3)
    pal = _exact_palette(colours)
    np.testing.assert_array_equal(pal.decode(torch.arange(pal.k)).numpy(), colours)
    np.testing.assert_array_equal(pal.encode(colours).numpy(), np.arange(pal.k))


@pytest.mark.parametrize("as_torch, chunk", [(False, None), (True, None), (False, 7), (True, 7)])
def test_encode_matches_brute_force_reference(as_torch, chunk):
    rng = np.random.default_rng(0)
    centers = rng.uniform(-1, 1, size=(37, 3)).astype(np.float32)
    pixels = rng.integers(0, 256, size=(10, 20, 15, 3), dtype=np.uint8)
    ids = Palette(centers).encode(torch.from_numpy(pixels) if as_torch else pixels, chunk=chunk)
    assert ids.dtype == torch.int64 and ids.shape == (10, 20, 15) and ids.device.type == "cpu"

    x = pixels.reshape(-1, 3).astype(np.float64) / 127.5 - 1
    dist = ((x[:, None, :] - centers[None].astype(np.float64)) ** 2).sum(-1)  # (N, K)
    ref = dist.argmin(1)
    got = ids.numpy().reshape(-1)
    # float32 may break a near-tie the other way; anything with a clear winner must agree exactly.
    gap = np.sort(dist, 1)[:, 1] - dist.min(1)
    clear = gap > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], ref[clear])
    assert np.all(dist[np.arange(len(got)), got] <= dist.min(1) + 1e-5)


def test_encode_rejects_wrong_dtype_and_shape():
    pal = _exact_palette(_grid_colours())
    with pytest.raises(ValueError, match="uint8"):
        pal.encode(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        pal.encode(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension of 3"):
        pal.encode(np.zeros((4, 4), dtype=np.uint8))


def test_decode_is_rint_of_scaled_centres():
    rng = np.random.default_rng(1)
    centers = rng.uniform(-1, 1, size=(50, 3)).astype(np.float32)
    centers[0] = [-1, 1, 0]  # the ends of the range and the exact half 127.5 (rint rounds it to 128)
    ids = rng.integers(0, 50, size=(6, 7))
    ids[0, 0] = 0
    want = np.rint(127.5 * (centers[ids] + 1)).astype(np.uint8)  # (6, 7, 3)
    pal = Palette(centers)
    for given in (ids, torch.from_numpy(ids), torch.from_numpy(ids).to(torch.int16)):
        got = pal.decode(given)
        assert got.dtype == torch.uint8 and got.shape == (6, 7, 3)
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(pal.decode(np.array([0])).numpy(), [[0, 255, 128]])


def test_encode_decode_round_trip_on_well_separated_palette():
    pal = _exact_palette(_grid_colours())
    ids = torch.randint(0, pal.k, (5, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pal.encode(pal.decode(ids)), ids)


def test_decode_rejects_bad_ids():
    pal = _exact_palette(_grid_colours())
    for bad in (np.array([0, pal.k]), torch.tensor([-1, 3]), np.array([2**63], dtype=np.uint64)):
        with pytest.raises(ValueError, match=rf"\[0, {pal.k}\)"):
            pal.decode(bad)
    with pytest.raises(ValueError, match="integers"):
        pal.decode(torch.tensor([0.0, 1.0]))


# --- construction and fingerprints -------------------------------------------------------------------


@pytest.mark.parametrize(
    "centers",
    [np.zeros((4, 2)), np.zeros((1, 3)), np.zeros(3), np.full((4, 3), np.nan), np.full((4, 3), 1.01)],
)
def test_constructor_rejects_bad_centres(centers):
    with pytest.raises(ValueError):
        Palette(centers)


def test_constructor_stores_float32_cpu_and_empty_meta():
    pal = Palette(np.linspace(-1, 1, 12).reshape(4, 3))  # float64 in
    assert pal.centers.dtype == torch.float32 and pal.centers.device.type == "cpu"
    assert pal.k == 4 and pal.meta == {}
    assert "k=4" in repr(pal) and pal.fingerprint() in repr(pal)


def test_fingerprint_sees_tiny_changes_and_ids_are_checked_by_it():
    centers = np.random.default_rng(2).uniform(-0.5, 0.5, size=(16, 3)).astype(np.float32)
    pal = Palette(centers)
    fp = pal.fingerprint()
    assert fp == hashlib.sha256(centers.astype("<f4").tobytes()).hexdigest()[:16]  # the documented format
    assert Palette(centers.copy()).fingerprint() == fp and pal.to("cpu").fingerprint() == fp
    nudged = centers.copy()
    nudged[5, 1] += 1e-6
    other = Palette(nudged)
    assert other.fingerprint() != fp

    ids = ImageSet(2, None, np.zeros((1, 4), np.uint16), None, None, fp, "dataset x")
    check_ids(ids, pal)
    no_fingerprint = ImageSet(2, None, ids.ids, None, None, None, "dataset x")  # OpenAI's: range checked only...
    check_ids(no_fingerprint, other, any_palette=True)
    with pytest.raises(ValueError, match="not OpenAI's kmeans_centers.npy: it has 16 colours"):
        check_ids(no_fingerprint, other)  # ...once the user accepts a palette that is not theirs
    with pytest.raises(ValueError, match=f"dataset x: ids were made with palette {fp}.*{other.fingerprint()}"):
        check_ids(ids, other)


# --- fitting -----------------------------------------------------------------------------------------


def test_fit_recovers_well_separated_blobs():
    corners = np.array([[a, b, c] for a in (40, 215) for b in (40, 215) for c in (40, 215)], np.uint8)
    pixels = _blobs(np.random.default_rng(3), corners, per_blob=300, spread=4)  # (8, 300, 3)
    pal = Palette.fit(pixels, k=8, iters=20, seed=0, device="cpu")
    ids = pal.encode(pixels).numpy()  # (8, 300)
    assert all(len(set(row)) == 1 for row in ids)  # each blob is one id...
    assert len(set(ids[:, 0])) == 8  # ...and different blobs are different ids
    np.testing.assert_allclose(pal.decode(ids[:, 0]).numpy(), corners, atol=1)
    m = pal.meta
    assert (m["k"], m["seed"], m["n_pixels"]) == (8, 0, 2400)
    assert m["n_unique"] == len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert 1 <= m["iters_run"] <= 20
    assert m["mse_uint8"] < 8  # per-channel variance of the +-4 noise is 20/3
    err = (pal.decode(pal.encode(pixels)).numpy().astype(float) - pixels) ** 2
    assert m["mse_uint8"] == pytest.approx(err.mean(), rel=1e-9)


def test_fit_is_deterministic_per_seed():
    pixels = np.random.default_rng(4).integers(0, 256, size=(4000, 3), dtype=np.uint8)  # no structure
    a = Palette.fit(pixels, k=16, iters=5, seed=0, device="cpu")
    b = Palette.fit(torch.from_numpy(pixels), k=16, iters=5, seed=0, device="cpu")
    c = Palette.fit(pixels, k=16, iters=5, seed=1, device="cpu")
    assert a.fingerprint() == b.fingerprint() and a.meta == b.meta
    assert c.fingerprint() != a.fingerprint()


def test_weighted_unique_lloyd_equals_plain_lloyd_on_all_pixels():
    rng = np.random.default_rng(5)
    palette_colours = rng.integers(0, 256, size=(40, 3))
    pixels = palette_colours[rng.integers(0, 40, size=3000)].astype(np.uint8)  # many repeats
    init = palette_colours[:6].astype(np.float32) / 127.5 - 1  # (6, 3), colours that occur in the pixels

    # Reference: plain Lloyd over every pixel, float64.
    x = pixels.astype(np.float64) / 127.5 - 1
    ref = init.astype(np.float64)
    for _ in range(4):
        lab = ((x[:, None] - ref[None]) ** 2).sum(-1).argmin(1)
        assert len(np.unique(lab)) == 6  # no empty cluster, so re-seeding plays no part
        ref = np.stack([x[lab == j].mean(0) for j in range(6)])
    ref_inertia = ((x[:, None] - ref[None]) ** 2).sum(-1).min(1).mean()

    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    points = _normalise(torch.from_numpy(colours))  # (U, 3)
    res = lloyd(points, torch.from_numpy(counts), torch.from_numpy(init), iters=4)
    assert res.iters_run == 4
    np.testing.assert_allclose(res.centers.numpy(), ref, atol=1e-6)
    assert res.inertia == pytest.approx(ref_inertia, rel=1e-5)


def test_lloyd_reseeds_empty_clusters():
    blobs = np.array([[20, 20, 20], [230, 20, 20], [20, 230, 20], [20, 20, 230]], np.uint8)
    pixels = _blobs(np.random.default_rng(6), blobs, per_blob=50, spread=3).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    points = _normalise(torch.from_numpy(colours))
    init = points[[0, 0, 1, 2]].clone()  # a duplicate: argmin sends nothing to centre 1
    assert torch.bincount(assign(points, init, 64)[0], minlength=4).tolist()[1] == 0

    res = lloyd(points, torch.from_numpy(counts), init, iters=10)
    assert (torch.bincount(res.labels, minlength=4) > 0).all()
    assert torch.equal(res.labels, assign(points, res.centers, 64)[0])  # labels belong to final centres
    assert len(set(Palette(res.centers).encode(blobs).tolist())) == 4  # and it found all four blobs


def test_fit_subsamples_to_max_pixels():
    pixels = np.random.default_rng(7).integers(0, 256, size=(5000, 3), dtype=np.uint8)
    pal = Palette.fit(pixels, k=4, iters=2, max_pixels=1000, device="cpu", progress=True)
    assert pal.meta["n_pixels"] == 1000 and pal.meta["n_pixels_given"] == 5000


def test_fit_needs_k_distinct_colours():
    pixels = np.repeat(_grid_colours(100)[:5], 20, axis=0)  # 5 distinct colours
    with pytest.raises(ValueError, match=r"k=8.*\b5\b"):
        Palette.fit(pixels, k=8, device="cpu")


# --- files -------------------------------------------------------------------------------------------


def test_save_load_npy_is_openai_layout(tmp_path):
    pal = _exact_palette(_grid_colours())
    path = tmp_path / "kmeans_centers.npy"
    pal.save(path)
    raw = np.load(path)
    assert raw.dtype == np.float32 and raw.shape == (pal.k, 3)
    assert Palette.load(path).fingerprint() == pal.fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kmeans_centers.npy"]  # no temp file left over

    np.save(tmp_path / "f64.npy", raw.astype(np.float64))  # OpenAI's dtype is unverified
    loaded = Palette.load(str(tmp_path / "f64.npy"))
    assert loaded.centers.dtype == torch.float32 and loaded.fingerprint() == pal.fingerprint()


def test_save_load_npz_keeps_meta(tmp_path):
    pixels = np.random.default_rng(8).integers(0, 256, size=(2000, 3), dtype=np.uint8)
    pal = Palette.fit(pixels, k=8, iters=3, device="cpu")
    path = tmp_path / "palette.npz"
    pal.save(path)
    pal.save(path)  # overwriting is fine
    back = Palette.load(path)
    assert back.fingerprint() == pal.fingerprint() and back.meta == pal.meta and back.meta["k"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["palette.npz"]


def test_file_errors_name_the_path(tmp_path):
    pal = _exact_palette(_grid_colours())
    bad_ext = tmp_path / "palette.txt"
    with pytest.raises(ValueError, match=re.escape(str(bad_ext))):
        pal.save(bad_ext)
    with pytest.raises(ValueError, match=re.escape(str(bad_ext))):
        Palette.load(bad_ext)
    missing = tmp_path / "missing.npy"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Palette.load(missing)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + r".*\(5, 4\)"):
        Palette.load(wrong)
    wrong_npz = tmp_path / "wrong.npz"
    np.savez(wrong_npz, centers=np.zeros(6, np.float32))
    with pytest.raises(ValueError, match=re.escape(str(wrong_npz)) + r".*\(6,\)"):
        Palette.load(wrong_npz)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a palette")
    mislabelled = tmp_path / "mislabelled.npz"
    with open(mislabelled, "wb") as f:
        np.save(f, pal.centers.numpy())  # .npy contents under an .npz name
    for target in (junk, mislabelled):
        with pytest.raises(ValueError, match=re.escape(str(target))):
            Palette.load(target)
