"""Sharded datasets: ``igpt prepare --shards`` output, WebDataset tars, and the streaming ShardStream
(exactly once across ranks and workers, resumable mid-epoch, the same global batch for any process count)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.data import shard_streams as shard_loader
from igpt.data.augment import imagenet_style
from igpt.cli import main
from igpt.data.open import open_split, open_training, prepare
from igpt.data.splits import split_indices
from igpt.distributed import World
from igpt.data.images import open_image
from igpt.tokenizers import Palette
from igpt.data.shard_streams import ShardImages, ShardStream
from igpt.data.shards import ShardIndex, is_shard_dir

GREYS = Palette(np.repeat((np.arange(16) * 17 / 127.5 - 1)[:, None], 3, axis=1))  # grey level 17*d -> id d
N_PX, B = 6, 8  # 6: CIFAR augmentation pads 4


def numbered(n: int) -> np.ndarray:
    """Images whose first 4 pixels spell their index in base 16 (greys 17*digit), so ids give it back."""
    grey = np.zeros((n, N_PX * N_PX), np.uint8)  # (n, T)
    grey[:, :4] = (np.arange(n)[:, None] // 16 ** np.arange(4)) % 16 * 17
    return np.repeat(grey.reshape(n, N_PX, N_PX, 1), 3, axis=3)


def index_of(ids: torch.Tensor) -> list[int]:
    return (ids[:, :4].cpu() * 16 ** torch.arange(4)).sum(1).tolist()


@pytest.fixture
def numbered_shards(tmp_path) -> Path:
    """70 numbered images (no val carve) in shards of 16: 5 shards, 8 full batches of 8, 6 dropped."""
    np.savez(tmp_path / "src.npz", x_train=numbered(70), y_train=np.arange(70) % 10)
    prepare(str(tmp_path / "src.npz"), tmp_path / "shards", n_px=N_PX, shards=16, val_fraction=0.0,
                 progress=False)
    return tmp_path / "shards"


def stream(root: Path, rows: slice = slice(None), workers: int = 0, augment: str = "none") -> ShardStream:
    split = ShardIndex.open(root).split("train")
    return ShardStream(split, B, 3, GREYS, torch.device("cpu"), N_PX, augment, workers, rows)


def assert_exactly_once(batches: list[list[int]], n: int, batch_size: int) -> None:
    """One epoch's batches read every sample once, except the dropped partial batch."""
    counts = Counter(i for batch in batches for i in batch)
    assert all(len(b) == batch_size for b in batches)
    assert max(counts.values()) == 1, f"read twice: {[i for i, c in counts.items() if c > 1]}"
    assert len(counts) == n - n % batch_size and set(counts) <= set(range(n))


def members(tar_path: Path) -> dict[int, tarfile.TarInfo]:
    """The members of a tar by the offset of their data, read independently of igpt."""
    with tarfile.open(tar_path) as tar:
        return {m.offset_data: m for m in tar.getmembers()}


# ------------------------------------------------------------------------------------------- writer


def test_prepare_shards_writes_what_shards_json_says(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 50)
    np.savez(tmp_path / "src.npz", x_train=x, y_train=y, label_names=np.array([f"c{k}" for k in range(10)]))
    out = tmp_path / "shards"
    assert main(["-q", "prepare", "--data", str(tmp_path / "src.npz"), "--n-px", "8", "--val-fraction", "0.2",
                 "--shards", "16", "--out", str(out)]) == 0
    meta = json.loads((out / "shards.json").read_text())
    assert meta["n_px"] == 8 and meta["classes"][3] == "c3" and meta["val_carved"]
    assert [s["n"] for s in meta["splits"]["train"]["shards"]] == [16, 16, 8] and meta["splits"]["val"]["n"] == 10
    train_idx, val_idx = split_indices(50, 0.2, 0)  # the carve of plain prepare
    keys = {}
    for name, entry in meta["splits"].items():
        keys[name] = []
        for shard in entry["shards"]:
            rows, found = np.load(out / shard["index"]), members(out / shard["tar"])
            assert len(rows) == shard["n"] and (out / shard["tar"]).stat().st_size == shard["bytes"]
            with tarfile.open(out / shard["tar"]) as tar:
                for offset, size, label in rows:
                    m = found[offset]
                    key, ext = m.name.split(".")
                    assert ext == "png" and m.size == size and label == y[int(key)]
                    assert tar.extractfile(key + ".cls").read() == str(label).encode()
                    pixels = np.array(Image.open(io.BytesIO(tar.extractfile(m).read())))
                    assert np.array_equal(pixels, x[int(key)])  # lossless
                    keys[name].append(int(key))
    assert sorted(keys["train"]) == list(train_idx) and sorted(keys["val"]) == list(val_idx)
    assert keys["train"] != sorted(keys["train"])  # written in a seeded random order
    back = open_split(str(out), "val", n_px=8)  # the other commands decode a split into memory
    assert np.array_equal(back.pixels, x[keys["val"]]) and np.array_equal(back.labels, y[keys["val"]])
    assert main(["-q", "prepare", "--data", str(tmp_path / "src.npz"), "--n-px", "8", "--shards", "16",
                 "--tokenizer", "p.npz", "--out", str(tmp_path / "o")]) == 2  # ids are not images


def test_interrupted_write_is_not_a_dataset(tmp_path, monkeypatch):
    import igpt.data.shard_writer

    real, calls = igpt.data.shard_writer._write_shard, []

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while writing the third shard
        return real(*args)

    monkeypatch.setattr(igpt.data.shard_writer, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare("digits", tmp_path / "s", n_px=8, shards=200, progress=False)
    assert not list((tmp_path / "s").glob(".tmp*")) and (tmp_path / "s" / "train-000001.tar").exists()
    assert is_shard_dir(tmp_path / "s")
    with pytest.raises(ValueError, match="did not finish"):
        open_split(str(tmp_path / "s"), "train", n_px=8)
    monkeypatch.undo()
    prepare("digits", tmp_path / "s", n_px=8, shards=2000, overwrite=True, progress=False)  # again, fewer shards
    assert sorted(p.name for p in (tmp_path / "s").glob("train-*")) == ["train-000000.idx.npy", "train-000000.tar"]
    assert len(ShardIndex.open(tmp_path / "s").split("train")) == 1294


def test_corrupt_or_truncated_shard_names_the_file(numbered_shards):
    split = ShardIndex.open(numbered_shards).split("train")
    offset, size, _ = split.rows[3]
    with open(split.tars[0], "r+b") as f:  # same size, garbage where sample 3's PNG was
        f.seek(int(offset))
        f.write(b"\0" * int(size))
    with pytest.raises(ValueError, match=r"train-000000\.tar: 0000000\d\d\.png is not a readable image"):
        ShardImages(split, N_PX)[3]
    assert ShardImages(split, N_PX)[4][0].shape == (N_PX, N_PX, 3)  # the others still read
    tar = numbered_shards / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"train-000002\.tar: .* bytes, shards\.json says .*truncated"):
        ShardIndex.open(numbered_shards)
    (numbered_shards / "shards.json").unlink()  # without its index, as a WebDataset tar: tarfile sees the cut
    for idx in numbered_shards.glob("*.idx.npy"):
        idx.unlink()
    with pytest.raises(ValueError, match=r"train-000002\.tar: not a readable uncompressed tar"):
        ShardIndex.open(numbered_shards)


# ------------------------------------------------------------------------------------------ streaming


def read_epoch(streams: list[ShardStream], n_batches: int) -> list[list[int]]:
    """The global batches of ``n_batches`` steps: each step, every rank's share in rank order."""
    return [[i for s in streams for i in index_of(s.next())] for _ in range(n_batches)]


def test_every_sample_exactly_once_across_ranks_and_workers(numbered_shards):
    single = read_epoch([stream(numbered_shards)], 8)
    assert_exactly_once(single, 70, B)
    ranks = [stream(numbered_shards, World(r, 2).slice(B), workers=2) for r in range(2)]
    assert read_epoch(ranks, 8) == single  # the same global batches, whoever reads them
    split = ShardIndex.open(numbered_shards).split("train")
    stored = index_of(GREYS.encode(shard_loader.decode_images(split, N_PX, np.arange(70))).flatten(1))
    where = {number: position for position, number in enumerate(stored)}  # image number -> stored position
    for batch in single:  # reads are local: a batch comes from one or two shards
        assert len({split.shard_of(where[i]) for i in batch}) <= 2
    two = read_epoch([stream(numbered_shards)], 16)
    assert two[8:] != single  # epoch 1 is reshuffled
    counts = np.diff(split.starts)  # the documented order: shards by (seed, epoch), samples by (seed, epoch, s)
    for epoch in (0, 1):
        order = np.concatenate([split.starts[s] + np.random.default_rng([3, epoch, s]).permutation(counts[s])
                                for s in np.random.default_rng([3, epoch]).permutation(len(counts))])
        assert [where[i] for batch in two[8 * epoch:8 * epoch + 8] for i in batch] == list(order[:64])


def test_exactly_once_check_catches_a_duplicate(numbered_shards, monkeypatch):
    real = shard_loader.global_batches

    def repeats_first(*args):  # a broken order that serves batch 0 twice
        batches = list(real(*args))
        return iter([batches[0]] + batches[:-1])

    monkeypatch.setattr(shard_loader, "global_batches", repeats_first)
    with pytest.raises(AssertionError, match="read twice"):
        assert_exactly_once(read_epoch([stream(numbered_shards)], 8), 70, B)


@pytest.mark.parametrize("k", [3, 8, 11])  # mid-epoch, at the epoch boundary, in the next epoch
def test_resume_continues_without_repeats_or_gaps(numbered_shards, k):
    first = stream(numbered_shards)
    run = read_epoch([first], 20)
    resumed = stream(numbered_shards)
    resumed.load_state_dict(stream_state_after(numbered_shards, k))
    assert read_epoch([resumed], 20 - k) == run[k:]
    for epoch in (run[:8], run[8:16]):
        assert_exactly_once(epoch, 70, B)


def stream_state_after(root: Path, k: int) -> dict[str, int]:
    s = stream(root)
    for _ in range(k):
        s.next()
    return json.loads(json.dumps(s.state_dict()))  # what a checkpoint keeps


def test_cifar_augmentation_same_for_any_process_count_and_after_resume(numbered_shards):
    single = stream(numbered_shards, augment="cifar")
    want = [single.next() for _ in range(10)]
    ranks = [stream(numbered_shards, World(r, 2).slice(B), workers=1, augment="cifar") for r in range(2)]
    for step in range(10):
        assert torch.equal(torch.cat([s.next() for s in ranks]), want[step])
    assert not torch.equal(want[0], stream(numbered_shards).next())  # it did augment
    resumed = stream(numbered_shards, augment="cifar")
    resumed.load_state_dict(stream_state_after(numbered_shards, 9))
    assert torch.equal(resumed.next(), want[9])


def test_image_folder_keeps_files_and_augments_in_workers(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "src" / c / f"{i}.jpg")
    (tmp_path / "src" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg is not a readable image"):
        prepare(str(tmp_path / "src"), tmp_path / "s", n_px=8, shards=5, val_fraction=0.0, progress=False)
    prepare(str(tmp_path / "src"), tmp_path / "s", n_px=8, shards=5, val_fraction=0.0, on_error="skip",
                 progress=False)
    index = ShardIndex.open(tmp_path / "s")
    split, files = index.split("train"), sorted((tmp_path / "src").glob("*/[0-9].jpg"))
    assert index.n_px is None and index.classes == ["cat", "dog"] and len(split) == 12
    images = ShardImages(split, 8, augment="imagenet", seed=5)
    for i in range(len(split)):
        key = int(images.where(i).split(": ")[1].split(".")[0])
        assert images.read(i) == files[key].read_bytes() and split.labels[i] == key // 6  # the original file
        want = imagenet_style(open_image(files[key]), 8, np.random.default_rng([5, 2, i]))
        assert np.array_equal(images[(2, i)][0].numpy(), want)  # FolderImages' per-sample random state
    ids = ShardStream(split, 4, 5, GREYS, torch.device("cpu"), 8, "imagenet", workers=1).next()
    assert ids.shape == (4, 64)
    prepare("digits", tmp_path / "small", n_px=8, shards=500, progress=False)
    with pytest.raises(ValueError, match="needs full-resolution images"):  # PNGs at 8x8 are not ImageNet
        open_training(str(tmp_path / "small"), 8, batch_size=4, seed=0, device=torch.device("cpu"),
                      augment="imagenet")


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, blob in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_external_webdataset_tars(tmp_path):
    x = numbered(30)
    root = tmp_path / "wds"
    root.mkdir()
    layout = (("imgs-train-000", range(12)), ("imgs-train-001", range(12, 24)), ("imgs-val-000", range(24, 30)))
    for shard, keys in layout:
        samples = {f"dir/s{i:03d}": {"png": png(x[i]), "cls": str(i % 3).encode(), "json": b"{}"} for i in keys}
        write_tar(root / f"{shard}.tar", samples | {"meta": {"json": b"{}"}})  # "meta": a sample with no image
    assert is_shard_dir(root)
    index = ShardIndex.open(root)
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 24, "val": 6} and index.splits["val"].labeled
    assert_exactly_once(read_epoch([stream(root)], 3), 24, B)
    val = open_split(str(root), "val", n_px=N_PX)
    assert np.array_equal(val.pixels, x[24:]) and list(val.labels) == [i % 3 for i in range(24, 30)]
    write_tar(root / "imgs-test-000.tar", {"a": {"txt": b"hello"}})
    with pytest.raises(ValueError, match=r"imgs-test-000\.tar: no image members"):
        ShardIndex.open(root)
    (root / "imgs-test-000.tar").write_bytes(b"\x1f\x8b" + bytes(600))  # a gzip-like file: not seekable members
    with pytest.raises(ValueError, match=r"imgs-test-000\.tar: not a readable uncompressed tar"):
        ShardIndex.open(root)


@pytest.mark.slow  # starts two training processes under torchrun
def test_two_processes_match_one_on_shards(tmp_path):
    """torchrun, 2 processes (gloo, CPU), each with a loader worker, gives the 1-process loss curve."""
    prepare("digits", tmp_path / "s", n_px=8, shards=200, progress=False)
    args = ["-q", "pretrain", "--preset", "igpt-nano", "--data", str(tmp_path / "s"), "--vocab-size", "16",
            "--max-steps", "3", "--batch-size", "16", "--warmup-steps", "1", "--eval-every", "3",
            "--eval-batches", "1", "--log-every", "1", "--device", "cpu", "--augment", "cifar"]
    curves = []
    for name, launcher, workers in (("one", [], "0"), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                                 "--nproc_per_node=2"], "1")):
        cmd = [sys.executable, *launcher, "-m", "igpt", *args, "--workers", workers, "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        curves.append([(r["step"], r["split"], r["loss"]) for r in map(json.loads, lines)])
    assert [c[:2] for c in curves[0]] == [c[:2] for c in curves[1]] and len(curves[0]) == 4
    assert [c[2] for c in curves[1]] == pytest.approx([c[2] for c in curves[0]], rel=1e-5)
