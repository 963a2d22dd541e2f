"""Bad input is one line naming the flag or the file, refused before anything is written.

Each case runs the CLI in-process (``igpt.cli.main``) in an empty working directory, and asserts exit code 2,
one line on stderr naming the culprit, and a working directory still empty afterwards (no run directory, no
output folder). The configs are also built directly, so the Python API gets the same checks.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rand_images

from igpt.cli import main
from igpt.config import (BenchLoaderConfig, BenchMemoryConfig, BenchSampleConfig, BenchTrainConfig, DataConfig,
                         EvalDataConfig, FeatureConfig, FinetuneConfig, ModelConfig, ProbeConfig, SampleConfig,
                         ScoreConfig, TrainConfig)
from igpt.data.imageset import check_ids
from igpt.data.open import lossless_mask, open_training, prepare
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.train import pretrain
from igpt.train.rundir import read_metrics
from igpt.weights.checkpoint import save_checkpoint

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained igpt-nano checkpoint at 4x4 with a 16-colour palette: enough for a command to load."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4))
    palette = Palette(torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    return save_checkpoint(path, model, palette, CheckpointRecord(model.config, palette.fingerprint(), step=1))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def refuse(argv: list[str], needle: str, untouched: Path, capsys) -> str:
    """Run ``igpt argv``: exit 2, one line naming ``needle``, and nothing under ``untouched`` written."""
    before = tree(untouched)
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, (needle, err)
    assert tree(untouched) == before
    return err


# ---- 1. flags: every numeric field is checked once, in its config


PRETRAIN = ["pretrain", "--preset", "igpt-nano", "--data", "digits", "--out", "run", "--max-steps", "1",
            "--device", "cpu"]
FLAG_CASES = [
    (PRETRAIN + ["--grad-clip", "-1"], "--grad-clip"),
    (PRETRAIN + ["--weight-decay", "-1"], "--weight-decay"),
    (PRETRAIN + ["--dist-timeout", "nan"], "--dist-timeout"),
    (PRETRAIN + ["--dist-timeout", "inf"], "--dist-timeout"),
    (PRETRAIN + ["--lr", "inf"], "--lr"),
    (PRETRAIN + ["--beta1", "1.5"], "--beta1"),
    (PRETRAIN + ["--beta2", "nan"], "--beta2"),
    (PRETRAIN + ["--log-every", "0"], "--log-every"),
    (PRETRAIN + ["--ckpt-every", "0"], "--ckpt-every"),
    (PRETRAIN + ["--seed", "-1"], "--seed"),
    (PRETRAIN + ["--dropout", "inf"], "--dropout"),
    (PRETRAIN + ["--objective", "bert", "--mask-prob", "inf"], "--mask-prob"),
    (PRETRAIN + ["--device", "mps"], "--device 'mps'"),
    (PRETRAIN + ["--device", "cuda:7"], "--device 'cuda:7'"),
    (PRETRAIN + ["--device", "tpu"], "--device 'tpu'"),
    (["sample", "--out", "o", "--temperature", "nan"], "--temperature"),
    (["sample", "--out", "o", "--temperature", "inf"], "--temperature"),
    (["sample", "--out", "o", "--top-p", "nan"], "--top-p"),
    (["sample", "--out", "o", "--seed", "-1"], "--seed"),
    (["sample", "--out", "o", "--scale", "0"], "--scale"),
    (["sample", "--out", "o", "--ncol", "0"], "--ncol"),
    (["sample", "--out", "o", "--device", "mps"], "--device"),
    (["complete", "--out", "o", "--data", "digits", "--temperature", "inf"], "--temperature"),
    (["complete", "--out", "o", "--data", "digits", "--rounds", "0"], "--rounds"),
    (["complete", "--out", "o", "--data", "digits", "--scale", "0"], "--scale"),
    (["complete", "--out", "o", "--data", "digits", "--split-seed", "-1"], "--split-seed"),
    (["score", "--data", "digits", "--json", "s.json", "--mask-prob", "nan"], "--mask-prob"),
    (["score", "--data", "digits", "--json", "s.json", "--seed", "-1"], "--seed"),
    (["probe", "--data", "digits", "--out", "o", "--l2", "nan"], "--l2"),
    (["probe", "--data", "digits", "--out", "o", "--l2", "inf"], "--l2"),
    (["probe", "--data", "digits", "--out", "o", "--mask-seed", "-1"], "--mask-seed"),
    (["finetune", "--data", "digits", "--out", "o", "--lr", "inf"], "--lr"),
    (["finetune", "--data", "digits", "--out", "o", "--beta1", "-0.1"], "--beta1"),
    (["finetune", "--data", "digits", "--out", "o", "--gen-weight", "inf"], "--gen-weight"),
    (["bench", "memory", "--preset", "igpt-nano", "--json", "m.json", "--gpu-gb", "inf"], "--gpu-gb"),
    (["bench", "memory", "--preset", "igpt-nano", "--json", "m.json", "--n-px", "0"], "--n-px"),
    (["bench", "sample", "--preset", "igpt-nano", "--json", "b.json", "--n-px", "0"], "--n-px"),
    (["bench", "train", "--preset", "igpt-nano", "--json", "b.json", "--device", "mps"], "--device"),
    (["bench", "loader", "--data", "digits", "--json", "b.json", "--seed", "-1"], "--seed"),
    (["prepare", "--data", "digits", "--n-px", "8", "--out", "cache", "--seed", "-1"], "--seed"),
    (["demo", "--out", "demo", "--steps", "0"], "--steps"),
    (["demo", "--out", "demo", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("argv,needle", FLAG_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_flag_is_one_line_and_leaves_nothing(argv, needle, ckpt, workdir, capsys):
    if argv[0] in ("sample", "complete", "score", "probe", "finetune"):
        argv = [argv[0], "--checkpoint", str(ckpt)] + argv[1:]
    refuse(argv, needle, workdir, capsys)
    assert not any(workdir.iterdir())  # no run directory, output folder or JSON file


CONFIG_CASES = [
    (ModelConfig, {"n_layer": NAN}, "--n-layer"),
    (ModelConfig, {"dropout": NAN}, "--dropout"),
    (TrainConfig, {"grad_clip": -1.0}, "--grad-clip"),
    (TrainConfig, {"weight_decay": -1e-3}, "--weight-decay"),
    (TrainConfig, {"dist_timeout": NAN}, "--dist-timeout"),
    (TrainConfig, {"lr": INF}, "--lr"),
    (TrainConfig, {"max_steps": INF}, "--max-steps"),
    (TrainConfig, {"log_every": 0}, "--log-every"),
    (TrainConfig, {"ckpt_every": 0}, "--ckpt-every"),
    (TrainConfig, {"seed": 2**32}, "--seed"),
    (TrainConfig, {"device": "cuda:x"}, "--device"),
    (DataConfig, {"val_fraction": NAN}, "--val-fraction"),
    (FinetuneConfig, {"grad_clip": INF}, "--grad-clip"),
    (FinetuneConfig, {"beta2": 1.0}, "--beta2"),
    (SampleConfig, {"temperature": INF}, "--temperature"),
    (SampleConfig, {"temperature": -0.5}, "--temperature"),
    (EvalDataConfig, {"split_seed": -1}, "--split-seed"),
    (ScoreConfig, {"mask_prob": INF}, "--mask-prob"),
    (FeatureConfig, {"mask_seed": -1}, "--mask-seed"),
    (ProbeConfig, {"l2": NAN}, "--l2"),
    (BenchSampleConfig, {"n_px": 0}, "--n-px"),
    (BenchTrainConfig, {"seed": -1}, "--seed"),
    (BenchLoaderConfig, {"device": "mps"}, "--device"),
    (BenchMemoryConfig, {"gpu_gb": NAN}, "--gpu-gb"),
]


@pytest.mark.parametrize("cls,kw,needle", CONFIG_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_the_python_api_gets_the_same_checks(cls, kw, needle):
    with pytest.raises(ValueError, match=needle) as e:
        cls(**kw)
    assert len(str(e.value).splitlines()) == 1


def test_zero_still_means_off_where_it_did():
    cfg = TrainConfig(grad_clip=0.0, eval_every=0, eval_batches=0, weight_decay=0.0)
    assert cfg.grad_clip == 0 and SampleConfig(temperature=0.0).temperature == 0
    assert math.isclose(ProbeConfig(l2=-1.0).grid[0], 1e-6) and ScoreConfig(mask_prob=-1.0).mask_prob == -1


def test_a_device_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert TrainConfig(device="cuda:0").device == "cuda:0"
    with pytest.raises(ValueError, match=r"--device 'cuda:7': this machine has 1 CUDA device\(s\)"):
        TrainConfig(device="cuda:7")


# ---- 3. a run directory's files: run.json and metrics.jsonl


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A two-step igpt-nano run on digits with both steps' metrics and a final checkpoint."""
    run = tmp_path_factory.mktemp("run") / "run"
    pretrain(ModelConfig.from_preset("igpt-nano"), TrainConfig(max_steps=2, batch_size=16, eval_every=0, log_every=1,
             device="cpu"), DataConfig(data="digits", vocab_size=8), run, progress=False)
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_a_truncated_run_json_is_named(run_copy, capsys):
    text = (run_copy / "run.json").read_text()
    (run_copy / "run.json").write_text(text[:len(text) // 2])
    refuse(["pretrain", "--resume", str(run_copy)], "run.json is not readable JSON", run_copy, capsys)


@pytest.mark.parametrize("edit,needle", [
    (lambda run: {k: v for k, v in run.items() if k != "train"}, "no 'train' section"),
    (lambda run: {**run, "train": {**run["train"], "log_every": 0}}, "--log-every"),
    (lambda run: {**run, "data": {**run["data"], "colour": 1}}, "colour"),
])
def test_a_run_json_edited_wrong_is_named(run_copy, capsys, edit, needle):
    path = run_copy / "run.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    err = refuse(["pretrain", "--resume", str(run_copy)], needle, run_copy, capsys)
    assert "run.json" in err


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(run_copy, capsys, caplog):
    path = run_copy / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"step": 3, "split": "tra')  # killed while appending
    with caplog.at_level(logging.WARNING, logger="igpt.train.rundir"):
        assert main(["pretrain", "--resume", str(run_copy)]) == 0
    assert "partial last line 3" in caplog.text and "metrics.jsonl" in caplog.text
    assert path.read_text() == whole  # the torn tail is gone, the records before it are kept
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2]


def test_a_corrupt_metrics_line_before_the_last_is_named_with_its_number(run_copy, capsys):
    path = run_copy / "metrics.jsonl"
    lines = path.read_text().splitlines()
    corrupt = "\n".join([lines[0], '{"step": 2, "loss": 1.0', *lines[1:]]) + "\n"
    path.write_text(corrupt)
    refuse(["pretrain", "--resume", str(run_copy)], "metrics.jsonl: line 2 is not a metrics record", run_copy,
           capsys)  # the file is left as it was, for the user to repair


# ---- 2. labels, and 3. numpy files igpt will not unpickle: one line naming the file


def _npz(path: Path, **arrays) -> str:
    arrays.setdefault("x_train", rand_images(6, 8, 8))
    np.savez(path, **arrays)  # allow_pickle is numpy's default when writing: object arrays are stored pickled
    return str(path)


def _truncated(path: Path, size: int) -> str:
    path.write_bytes(path.read_bytes()[:size])  # a copy cut short
    return str(path)


def _cifar(root: Path, labels: list, names: list[str]) -> str:
    root.mkdir()
    rows = rand_images(len(labels), 32, 32).transpose(0, 3, 1, 2).reshape(len(labels), 3072)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    return str(root)


def _stl10(root: Path, labels: list[int], names: list[str]) -> str:
    root.mkdir()
    (root / "train_X.bin").write_bytes(rand_images(len(labels), 96, 96).tobytes())
    (root / "train_y.bin").write_bytes(bytes(labels))
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    return str(root)


def _cache_with(root: Path, name: str, array: np.ndarray) -> str:
    """A pixel cache written by prepare, then one of its arrays replaced by ``array``."""
    prepare(_npz(root.parent / f"{root.name}.npz", y_train=np.arange(6) % 2), root, n_px=8, val_fraction=0.0,
            progress=False)
    np.save(root / name, array, allow_pickle=True)
    return str(root)


def _openai(prefix: Path, x: np.ndarray) -> str:
    np.save(f"{prefix}_trX.npy", x, allow_pickle=True)
    return str(prefix)


OBJECTS = np.array([1, "two", None], dtype=object)
DATA_CASES = {
    "npz float labels": (lambda d: _npz(d / "f.npz", y_train=np.arange(6, dtype=np.float32) % 2),
                         "f.npz: y_train: labels must be integer class ids, got dtype float32"),
    "npz label past label_names": (lambda d: _npz(d / "p.npz", y_train=np.arange(6) % 3,
                                                  label_names=np.array(["cat", "dog"])),
                                   "p.npz: y_train: label 2 has no class name: the data names 2 classes"),
    "npz negative label": (lambda d: _npz(d / "n.npz", y_train=np.arange(6) - 1), "n.npz: y_train: labels must be >= 0"),
    "npz object label_names": (lambda d: _npz(d / "o.npz", y_train=np.arange(6) % 3, label_names=OBJECTS),
                               "o.npz: array 'label_names' cannot be read: it holds Python objects"),
    "npz object pixels": (lambda d: _npz(d / "x.npz", x_train=OBJECTS), "x.npz: array 'x_train' cannot be read"),
    "npz truncated": (lambda d: _truncated(Path(_npz(d / "t.npz")), 300), "t.npz: not a readable .npz archive"),
    "cifar float labels": (lambda d: _cifar(d / "cifar", [0.0, 1.5], ["a", "b"]),
                           "data_batch_1: b'labels': labels must be integer class ids"),
    "cifar label past its names": (lambda d: _cifar(d / "cifar", [0, 2], ["a", "b"]),
                                   "data_batch_1: b'labels': label 2 has no class name"),
    "stl10 label past class_names.txt": (lambda d: _stl10(d / "stl", [1, 3], ["a", "b"]),
                                         "train_y.bin: label 2 has no class name"),
    "cache float labels": (lambda d: _cache_with(d / "cache", "train_labels.npy", np.zeros(6, np.float64)),
                           "train_labels.npy: labels must be integer class ids, got dtype float64"),
    "cache object pixels": (lambda d: _cache_with(d / "cache", "train_pixels.npy", OBJECTS),
                            "train_pixels.npy: not a readable .npy array: it holds Python objects"),
    "openai object ids": (lambda d: _openai(d / "cifar10", OBJECTS), "cifar10_trX.npy: not a readable .npy array"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_a_bad_data_file_is_one_line_naming_it(case, tmp_path, workdir, capsys):
    make, needle = DATA_CASES[case]
    data = make(tmp_path)
    argv = (["palette", "fit", "--data", data, "--n-px", "8", "--vocab-size", "2", "--out", "p.npz"]
            if "cache" in case else ["prepare", "--data", data, "--n-px", "8", "--out", "cache"])
    refuse(argv, needle, workdir, capsys)
    assert not any(workdir.iterdir())


def test_an_object_array_palette_and_lossless_mask_are_named(tmp_path, workdir, capsys):
    np.save(tmp_path / "kmeans_centers.npy", OBJECTS, allow_pickle=True)
    refuse(["prepare", "--data", "digits", "--n-px", "8", "--tokenizer", str(tmp_path / "kmeans_centers.npy"),
            "--out", "cache"], "kmeans_centers.npy could not be read", workdir, capsys)
    data = _npz(tmp_path / "l.npz", x_test=rand_images(3, 8, 8), test_lossless=OBJECTS)
    with pytest.raises(ValueError, match="l.npz: array 'test_lossless' cannot be read"):
        lossless_mask(data, 3)


# ---- 3. palette ids meet a palette: OpenAI's pre-quantized files record none


@pytest.fixture
def openai_files(tmp_path) -> dict[str, str]:
    """OpenAI-layout ids at 4x4 (ids 0..511, and 0..15 for a 16-colour checkpoint), OpenAI's palette as
    they ship it (a plain .npy of 512 colours), and a 512-colour palette fitted by igpt."""
    rng = np.random.default_rng(0)
    for prefix, high in (("wide", 512), ("narrow", 16)):
        np.save(tmp_path / f"{prefix}_trX.npy", rng.integers(0, high, (6, 16)))
        np.save(tmp_path / f"{prefix}_teX.npy", rng.integers(0, high, (3, 16)))
        np.save(tmp_path / f"{prefix}_teY.npy", np.eye(2, dtype=np.float32)[[0, 1, 0]])
    centers = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    Palette(centers).save(tmp_path / "kmeans_centers.npy")
    fitted = Palette(centers[::-1].copy())
    fitted.meta = {"k": 512, "seed": 0}
    fitted.save(tmp_path / "fitted.npz")
    Palette(centers[:16]).save(tmp_path / "p16.npy")
    return {k: str(tmp_path / v) for k, v in (("wide", "wide"), ("narrow", "narrow"), ("openai", "kmeans_centers.npy"),
                                               ("fitted", "fitted.npz"), ("p16", "p16.npy"))}


def test_openai_ids_past_a_small_palette_name_the_data_and_the_palette(openai_files, workdir, capsys):
    f = openai_files
    err = refuse(["prepare", "--data", f["wide"], "--n-px", "4", "--tokenizer", f["p16"], "--out", "cache"],
                 "past the 16 colours (ids 0..15) of palette", workdir, capsys)
    assert f["wide"] in err and "p16.npy" in err and not any(workdir.iterdir())
    refuse(["bench", "loader", "--data", f["wide"], "--n-px", "4", "--tokenizer", f["p16"], "--batch-size", "2",
            "--device", "cpu"], "past the 16 colours", workdir, capsys)


def test_a_validation_split_past_the_palette_is_refused_before_the_first_step(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v_trX.npy", rng.integers(0, 16, (6, 16)))  # train fits 16 colours, val does not
    np.save(tmp_path / "v_vaX.npy", rng.integers(0, 512, (3, 16)))
    data = open_training(str(tmp_path / "v"), 4, batch_size=2, seed=0, device=torch.device("cpu"))
    palette = Palette(rng.uniform(-1, 1, (16, 3)))
    check_ids(data.fit_set, palette, any_palette=True)
    with pytest.raises(ValueError, match=r"v: holds ids up to 5\d\d, past the 16 colours"):
        data.make_stream(palette)  # was an IndexError in the embedding at the first evaluation


@pytest.mark.parametrize("command", ["prepare", "score", "bench loader"])
def test_openai_ids_need_openai_palette_or_any_palette(command, openai_files, ckpt, workdir, capsys):
    f = openai_files
    argv, ok = {
        "prepare": (["prepare", "--data", f["wide"], "--n-px", "4", "--tokenizer", f["fitted"], "--out", "cache"],
                    ["prepare", "--data", f["wide"], "--n-px", "4", "--tokenizer", f["openai"], "--out", "cache"]),
        "score": (["score", "--checkpoint", str(ckpt), "--data", f["narrow"], "--device", "cpu"], None),
        "bench loader": (["bench", "loader", "--data", f["wide"], "--n-px", "4", "--tokenizer", f["fitted"],
                          "--batch-size", "2", "--batches", "1", "--warmup", "0", "--device", "cpu"], None),
    }[command]
    err = refuse(argv, "is not OpenAI's kmeans_centers.npy", workdir, capsys)
    assert "--any-palette" in err and not any(workdir.iterdir())
    assert main(argv + ["--any-palette"]) == 0  # the user says the palette is right
    if ok is not None:
        shutil.rmtree(workdir / "cache")
        assert main(ok) == 0  # OpenAI's own file, recognised by its format


def test_pretraining_on_openai_ids_refuses_a_fitted_palette(openai_files, workdir, capsys):
    f = openai_files
    capsys.readouterr()
    assert main(["pretrain", "--preset", "igpt-nano", "--n-px", "4", "--data", f["wide"], "--tokenizer", f["fitted"],
                 "--out", "run", "--batch-size", "2", "--max-steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fitted.npz" in err and "is not OpenAI's kmeans_centers.npy" in err
    # igpt.train.pretrain writes run.json before it reads the data, so the run directory stays behind, but
    # no step was taken
    assert not (workdir / "run" / "checkpoints").exists()
