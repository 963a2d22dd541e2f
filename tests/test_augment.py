"""The paper's augmentations (igpt.data.augment), checked against slow per-image references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.data.augment import FolderImages, cifar_augment, cifar_augment_params, imagenet_style
from igpt.data.images import load_image


def batch(b: int = 16, h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8))


def reference(x: np.ndarray, dy: int, dx: int, flip: bool, pad: int = 4) -> np.ndarray:
    """One image, the obvious way: pad, crop, flip."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    crop = padded[dy:dy + h, dx:dx + w]
    return crop[:, ::-1] if flip else crop


def test_cifar_augment_matches_reference():
    x = batch()
    out = cifar_augment(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.uint8
    dy, dx, flip = cifar_augment_params(len(x), torch.Generator().manual_seed(7))
    assert {int(v) for v in dy} <= set(range(9)) and len({int(v) for v in dy}) > 1
    for i in range(len(x)):
        want = reference(x[i].numpy(), int(dy[i]), int(dx[i]), bool(flip[i]))
        assert np.array_equal(out[i].numpy(), want), i


def test_cifar_augment_deterministic_and_seeded():
    x = batch()
    a = cifar_augment(x, torch.Generator().manual_seed(1))
    b = cifar_augment(x, torch.Generator().manual_seed(1))
    c = cifar_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cifar_flips_about_half():
    x = batch(b=2000, h=6, w=5)
    out = cifar_augment(x, torch.Generator().manual_seed(0), pad=0)  # no shift: output is x or its mirror
    flipped = (out == x.flip(2)).flatten(1).all(1)
    assert torch.equal(flipped | (out == x).flatten(1).all(1), torch.ones(2000, dtype=torch.bool))
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_cifar_augment_id_grid_and_errors():
    ids = torch.arange(2 * 8 * 8).view(2, 8, 8, 1)  # int64 ids, one channel
    out = cifar_augment(ids, torch.Generator().manual_seed(0))
    assert out.shape == ids.shape and out.dtype == torch.int64
    with pytest.raises(ValueError, match="larger than 4"):
        cifar_augment(batch(h=4, w=4), torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cifar_augment_same_on_gpu():
    x = batch()
    cpu = cifar_augment(x, torch.Generator().manual_seed(3))
    gpu = cifar_augment(x.cuda(), torch.Generator().manual_seed(3))
    assert torch.equal(cpu, gpu.cpu())


def test_imagenet_style_shape_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    a = imagenet_style(img, 16, np.random.default_rng(5))
    b = imagenet_style(img, 16, np.random.default_rng(5))
    c = imagenet_style(img, 16, np.random.default_rng(6))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    grey = Image.fromarray(np.zeros((300, 40), np.uint8))
    assert imagenet_style(grey, 8, np.random.default_rng(0)).shape == (8, 8, 3)


def test_imagenet_style_crop_region():
    """A flat image stays flat; a two-colour image gives only colours between the two."""
    left = np.zeros((256, 512, 3), np.uint8)
    left[:, 256:] = 200
    out = imagenet_style(Image.fromarray(left), 8, np.random.default_rng(0))
    assert out.min() >= 0 and out.max() <= 200
    flat = Image.new("RGB", (400, 300), (10, 20, 30))
    assert (imagenet_style(flat, 8, np.random.default_rng(1)) == (10, 20, 30)).all()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, cls in enumerate(["a", "a", "b"]):
        path = tmp_path / "imgs" / cls / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return tmp_path / "imgs"


def test_folder_images(folder: Path):
    ds = FolderImages(folder, 8, seed=3)
    assert len(ds) == 3 and ds.classes == ["a", "b"]
    x, y = ds[(2, 1)]
    assert x.shape == (8, 8, 3) and x.dtype == torch.uint8 and y == 0
    assert torch.equal(FolderImages(folder, 8, seed=3)[(2, 1)][0], x)  # another "worker", same sample
    assert not torch.equal(ds[(3, 1)][0], x)  # next epoch, new augmentation
    assert torch.equal(ds[1][0], ds[(0, 1)][0]) and ds[-1][1] == 1
    center = FolderImages(folder, 8, augment="center")
    assert np.array_equal(center[2][0].numpy(), load_image(folder / "b" / "2.png", 8))
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 8, 8, 3) and yb.tolist() == [0, 0, 1]
    with pytest.raises(IndexError):
        ds[3]


def test_folder_images_flat_and_errors(folder: Path, tmp_path: Path):
    flat = FolderImages(folder / "a", 8)
    assert len(flat) == 2 and flat[0][1] == -1
    (folder / "a" / "3.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="3.png"):
        FolderImages(folder / "a", 8)[2]
    skip = FolderImages(folder / "a", 8, on_error="skip", augment="center")
    assert torch.equal(skip[2][0], skip[0][0])  # the next readable image, wrapping around
    with pytest.raises(ValueError, match="augment"):
        FolderImages(folder, 8, augment="cifar")
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/val/test"):
        FolderImages(tmp_path / "split", 8)
    with pytest.raises(ValueError, match="not a directory"):
        FolderImages(tmp_path / "nowhere", 8)
