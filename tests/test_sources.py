"""Readers of every --data format (igpt.data.sources), on tiny files made in tmp_path. The prepared cache is in
test_data.py, single-image decoding and resizing in test_images.py."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import rand_images, smooth_image, write_openai
from PIL import Image

from igpt.data.images import to_n_px
from igpt.data.sources import list_image_folder

from conftest import read_source


def write_cifar(root: Path, batches: dict[str, tuple[np.ndarray, list[int]]], label_key: bytes,
                meta_name: str, meta: dict, protocol: int) -> None:
    root.mkdir(parents=True)
    for name, (x, y) in batches.items():
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # a row = R plane | G plane | B plane
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rows, label_key: y, b"batch_label": name.encode()}, f, protocol=protocol)
    with open(root / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=protocol)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    x = rand_images(12, 32, 32, 3)
    y = [k % 10 for k in range(12)]
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    batches = {n: (x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]) for i, n in enumerate(names)}
    root = tmp_path / "parent" / "cifar-10-batches-py"
    write_cifar(root, batches, b"labels", "batches.meta",
                {b"label_names": [f"c{k}".encode() for k in range(10)]}, protocol=4)
    return root, x, np.asarray(y)


def write_stl(root: Path, x: np.ndarray, split: str, labels: np.ndarray | None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 3, 2, 1)).tobytes())  # column-major
    if labels is not None:
        (root / f"{split}_y.bin").write_bytes(labels.astype(np.uint8).tobytes())


def save_png(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def labelled_dir(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    x = rand_images(3, 8, 8, 4)
    save_png(root / "cat" / "a.png", Image.fromarray(x[0]))
    save_png(root / "cat" / "b.JPG", Image.fromarray(smooth_image(8, 8)))
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    save_png(root / "dog" / "grey.png", Image.fromarray(x[2, :, :, 0]))  # mode L
    rgba = np.concatenate([x[0], np.full((8, 8, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0
    save_png(root / "dog" / "rgba.png", Image.fromarray(rgba))
    pal = Image.fromarray(x[1]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save_png(root / "dog" / "sub" / "pal.png", pal)
    return root


# ---------------------------------------------------------------------------------------------- readers


def test_npz_reader_shapes_labels_orientation(npz_file):
    path, arrays = npz_file
    splits = read_source(str(path), 8)
    assert sorted(splits) == ["test", "train"]
    tr = splits["train"]
    assert tr.pixels.dtype == np.uint8 and np.array_equal(tr.pixels, arrays["x_train"])
    assert tr.labels.dtype == np.int64 and np.array_equal(tr.labels, arrays["y_train"])
    assert tr.classes == ["a", "b", "c"] and tr.ids is None
    assert read_source(str(path), 4)["test"].pixels.shape == (4, 4, 4, 3)


def test_npz_without_x_train(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"bad\.npz.*x_train.*images"):
        read_source(str(tmp_path / "bad.npz"), 4)


def test_cifar10_python(cifar10_dir):
    root, x, y = cifar10_dir
    for spec in (root, root.parent):  # the folder itself or the parent holding cifar-10-batches-py
        s = read_source(str(spec), 32)
        assert np.array_equal(s["train"].pixels, x[:10]) and np.array_equal(s["test"].pixels, x[10:])
        assert np.array_equal(s["train"].labels, y[:10]) and s["train"].labels.dtype == np.int64
        assert s["test"].classes == [f"c{k}" for k in range(10)]
    assert read_source(str(root), 16)["train"].pixels.shape == (10, 16, 16, 3)


def test_cifar10_incomplete(cifar10_dir):
    root, _, _ = cifar10_dir
    (root / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        read_source(str(root), 32)


def test_cifar100_python(tmp_path):
    x = rand_images(5, 32, 32, 5)
    root = tmp_path / "cifar-100-python"
    write_cifar(root, {"train": (x[:3], [5, 99, 0]), "test": (x[3:], [1, 2])}, b"fine_labels", "meta",
                {b"fine_label_names": [f"f{k}".encode() for k in range(100)]}, protocol=2)
    s = read_source(str(tmp_path), 32)
    assert np.array_equal(s["train"].pixels, x[:3]) and np.array_equal(s["test"].pixels, x[3:])
    assert s["train"].labels.tolist() == [5, 99, 0] and s["train"].classes[99] == "f99"


def test_cifar_pickles_numpy1_names_and_refusal(cifar10_dir, tmp_path):
    root, x, _ = cifar10_dir
    batch = root / "data_batch_2"
    rows = x[2:4].transpose(0, 3, 1, 2).reshape(2, 3072)
    raw = pickle.dumps({b"data": rows, b"labels": [2, 3]}, protocol=2)  # text opcodes: names can be edited
    batch.write_bytes(raw.replace(b"numpy._core", b"numpy.core"))  # the module name numpy 1 wrote
    assert b"numpy.core.multiarray" in batch.read_bytes()
    assert np.array_equal(read_source(str(root), 32)["train"].pixels, x[:10])
    with open(batch, "wb") as f:  # a pickle that would call os.system must be refused, not run
        pickle.dump({b"data": os.system, b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2.*refusing to load posix\.system"):
        read_source(str(root), 32)


def test_stl10_binary_column_major(tmp_path):
    root = tmp_path / "stl10_binary"
    x = rand_images(5, 96, 96, 6)
    write_stl(root, x[:2], "train", np.array([1, 10]))
    write_stl(root, x[2:3], "test", np.array([3]))
    write_stl(root, x[3:], "unlabeled", None)
    (root / "class_names.txt").write_text("\n".join(f"s{k}" for k in range(10)) + "\n")
    s = read_source(str(tmp_path), 96)
    assert np.array_equal(s["train"].pixels, x[:2]) and np.array_equal(s["unlabeled"].pixels, x[3:])
    assert s["train"].labels.tolist() == [0, 9] and s["test"].classes[0] == "s0"
    assert s["unlabeled"].labels is None
    small = read_source(str(root), 32)
    assert small["unlabeled"].pixels.shape == (2, 32, 32, 3)
    expected = to_n_px(x[3], 32, "center")  # the same resize as every other reader
    assert np.array_equal(small["unlabeled"].pixels[0], expected)



def test_openai_prequantized(tmp_path):
    arrays = write_openai(tmp_path / "cifar10", {"tr": 6, "va": 2, "te": 3}, t=16)
    for spec in (tmp_path / "cifar10", tmp_path):
        s = read_source(str(spec), 4)
        assert sorted(s) == ["test", "train", "val"] and s["train"].pixels is None
        assert s["train"].ids.dtype == np.uint16 and np.array_equal(s["train"].ids, arrays["trX"])
        assert np.array_equal(s["val"].labels, arrays["vaY"].argmax(1))
    (tmp_path / "cifar10_teY.npy").unlink()
    assert read_source(str(tmp_path / "cifar10"), 4)["test"].labels is None


def test_openai_errors(tmp_path):
    write_openai(tmp_path / "cifar10", {"tr": 3}, t=16)
    with pytest.raises(ValueError, match=r"cifar10_trX\.npy.*T=16.*n_px=8"):
        read_source(str(tmp_path / "cifar10"), 8)
    np.save(tmp_path / "cifar10_trX.npy", np.full((3, 16), 512))
    with pytest.raises(ValueError, match=r"cifar10_trX\.npy.*0\.\.511"):
        read_source(str(tmp_path / "cifar10"), 4)
    write_openai(tmp_path / "imagenet", {"tr": 3}, t=16)
    with pytest.raises(ValueError, match=r"several OpenAI files.*cifar10_trX.*imagenet_trX"):
        read_source(str(tmp_path), 4)


def test_labelled_folder(labelled_dir):
    s = read_source(str(labelled_dir), 8)
    tr = s["train"]
    assert list(s) == ["train"] and tr.classes == ["cat", "dog"]
    assert tr.pixels.shape == (5, 8, 8, 3) and tr.labels.tolist() == [0, 0, 1, 1, 1]
    x = rand_images(3, 8, 8, 4)
    assert np.array_equal(tr.pixels[0], x[0])  # PNG: lossless and in the right orientation
    assert np.abs(tr.pixels[1].astype(int) - smooth_image(8, 8)).mean() < 8  # JPEG: lossy, same picture
    grey = tr.pixels[2]
    assert np.array_equal(grey[..., 0], x[2, :, :, 0]) and (grey == grey[..., :1]).all()  # replicated
    assert tr.pixels[3, 0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert np.array_equal(tr.pixels[3, 1:], x[0, 1:])  # opaque -> unchanged


def test_split_layout_folder(tmp_path):
    x = rand_images(4, 8, 8, 7)
    for i, rel in enumerate(["train/a/0.png", "train/b/1.png", "test/b/2.png", "val/a/3.png"]):
        save_png(tmp_path / rel, Image.fromarray(x[i]))
    s = read_source(str(tmp_path), 8)
    assert sorted(s) == ["test", "train", "val"]
    assert s["train"].labels.tolist() == [0, 1] and s["test"].labels.tolist() == [1]
    assert s["test"].classes == ["a", "b"] and np.array_equal(s["val"].pixels[0], x[3])


def test_flat_folder(tmp_path):
    x = rand_images(3, 10, 6, 8)
    for i in range(3):
        save_png(tmp_path / f"{i}.PNG", Image.fromarray(x[i]))
    s = read_source(str(tmp_path), 6)
    assert list(s) == ["train"] and s["train"].labels is None and s["train"].classes is None
    assert np.array_equal(s["train"].pixels[0], x[0, 2:8])  # centre crop of the 10x6 image


def test_corrupt_file_stop_and_skip(labelled_dir, caplog):
    bad = labelled_dir / "cat" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_source(str(labelled_dir), 8)
    with caplog.at_level(logging.WARNING):
        s = read_source(str(labelled_dir), 8, on_error="skip")
    assert len(s["train"].pixels) == 5 and s["train"].labels.tolist() == [0, 0, 1, 1, 1]
    assert "skipped 1 unreadable" in caplog.text and "broken.png" in caplog.text


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        read_source(str(tmp_path / "empty"), 8)
    save_png(tmp_path / "cls" / "a" / "0.png", Image.new("RGB", (4, 4)))
    (tmp_path / "cls" / "b").mkdir()
    with pytest.raises(ValueError, match=r"cls[/\\]b.*no images"):
        read_source(str(tmp_path / "cls"), 8)
    with pytest.raises(ValueError, match=r"nowhere.*accepted"):
        read_source(str(tmp_path / "nowhere"), 8)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "readme.md").write_text("hi")
    with pytest.raises(ValueError, match=r"txt.*accepted"):
        read_source(str(tmp_path / "txt"), 8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="x.png"):
        read_source(str(tmp_path / "bad"), 8, on_error="skip")  # zero usable images


def test_digits():
    s = read_source("digits", 8)
    tr, te = s["train"], s["test"]
    assert len(tr.pixels) + len(te.pixels) == 1797 and len(te.pixels) == 359
    assert tr.pixels.dtype == np.uint8 and tr.pixels.max() == 255 and tr.classes == [str(k) for k in range(10)]
    assert (tr.pixels == tr.pixels[..., :1]).all()
    assert np.array_equal(te.labels, read_source("digits", 8)["test"].labels)  # fixed split


def test_list_image_folder_rejects_mixed(tmp_path):
    save_png(tmp_path / "a.png", Image.new("RGB", (2, 2)))
    save_png(tmp_path / "c" / "b.png", Image.new("RGB", (2, 2)))
    with pytest.raises(ValueError, match="both images and sub-folders"):
        list_image_folder(tmp_path)


# ---------------------------------------------------------------------------------------------- splits
