"""Unlucky inputs and resources: a tokenizer fit that diverges, tokenizer files holding NaN, a named pipe in
an image folder, a stop before the first step, and a full disk or a file-size limit while probe features
are written. Each ends in one line, keeps what was good on disk and never leaves something that reads as
complete when it is not. docs/reliability.md tabulates them."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from PIL import Image

from conftest import flat_pictures, rand_images
from igpt.cli import main
from igpt.config import DataConfig, FeatureConfig, ModelConfig, TrainConfig
from igpt.data.open import open_split, resolve
from igpt.config.tokenizer import TokenizerFitConfig, VQConfig
from igpt.data.images import images_to_pixels
from igpt.data.imageset import ImageSet
from igpt.eval import feature_store
from igpt.eval.features import cached_extract, extract
from igpt.model import GPT
from igpt.tokenizers import Palette, VQTokenizer, load_tokenizer
from igpt.stop import EXIT_STOPPED, Stopped
from igpt.train import pretrain, resume
from igpt.train.tokenizer import fit_tokenizer
from test_faults import FLAGS, error_line, igpt_cli, steps_of

TINY = VQConfig(input_side=8, factor=2, vocab_size=8, code_dim=4, hidden=8, res_blocks=1, kmeans_iters=2)
FIT = TokenizerFitConfig(steps=4, batch_size=16, eval_every=4, log_every=1, ckpt_every=1, val_images=8, device="cpu")
DIVERGES = TokenizerFitConfig(**{**FIT.to_dict(), "lr": 1e10})  # finite after step 1, NaN from step 2 on


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fit") / "blobs.npz"
    np.savez(path, x_train=flat_pictures(48, 0), y_train=np.arange(48) % 2)
    return path


# ---- a tokenizer fit that diverges


def test_a_diverging_tokenizer_fit_stops_in_one_line_and_keeps_the_last_good_tokenizer(npz, tmp_path, capsys):
    out = tmp_path / "fit"
    code = main(["tokenizer", "fit", "--data", str(npz), "--out", str(out), "--steps", "4", "--batch-size", "16",
                 "--eval-every", "4", "--ckpt-every", "1", "--val-images", "8", "--device", "cpu", "--lr", "1e10",
                 "--input-side", "8", "--factor", "2", "--vocab-size", "8", "--code-dim", "4", "--hidden", "8",
                 "--res-blocks", "1", "--kmeans-iters", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("igpt tokenizer: error: loss became nan at step 2: the learning rate is too high")
    assert f"{out / 'tokenizer.safetensors'} is the last good tokenizer (step 1)" in err[-1]
    # the files on disk are step 1's, whole and finite: the same as a fit that stopped there
    one = fit_tokenizer(str(npz), tmp_path / "one", TINY,
                        TokenizerFitConfig(**{**DIVERGES.to_dict(), "steps": 1}), progress=False)
    for path in (out / "tokenizer.safetensors", out / "checkpoint" / "tokenizer.safetensors"):
        tok = load_tokenizer(path)
        assert tok.meta["steps"] == 1 and tok.fingerprint() == one["fingerprint"]


def test_a_fit_whose_weights_go_non_finite_writes_nothing(npz, tmp_path, monkeypatch):
    """Weights that turn NaN on the last step (a finite loss before it) are never saved."""
    out = tmp_path / "fit"
    step = torch.optim.Adam.step

    def poisoning(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning)
    with pytest.raises(FloatingPointError, match=r"tensor 'encoder.0.weight' became NaN or infinite at step 3.*"
                                                 r"last good tokenizer \(step 2\)"):
        fit_tokenizer(str(npz), out, TINY, FIT, progress=False)
    assert load_tokenizer(out / "tokenizer.safetensors").meta["steps"] == 2


# ---- tokenizer files holding NaN or infinities


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_tokenizer_file_with_non_finite_values_is_refused_naming_file_and_tensor(npz, tmp_path, value):
    good = fit_tokenizer(str(npz), tmp_path / "fit", TINY, TokenizerFitConfig(**{**FIT.to_dict(), "steps": 1}),
                         progress=False)["tokenizer"]
    with safe_open(good, framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.endswith("embed"))  # the codebook
    tensors[name][0, 0] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    for read in (load_tokenizer, VQTokenizer.load):
        with pytest.raises(ValueError) as e:
            read(bad)
        kind = "NaN" if value != value else "infinite"
        assert str(e.value).startswith(f"tokenizer file {bad}: tensor {name} holds {kind} values")
    model = VQTokenizer.load(good).model
    with torch.no_grad():
        model.vq.codebook[0, 0] = value
    with pytest.raises(FloatingPointError, match="holds NaN or infinite values; not written"):
        VQTokenizer(model).save(tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_palette_file_with_non_finite_values_is_refused_naming_it(tmp_path, suffix, value):
    centers = np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3)
    centers[3, 1] = value
    path = tmp_path / f"palette{suffix}"
    if suffix == ".npy":
        np.save(path, centers)
    else:
        np.savez(path, centers=centers)
    with pytest.raises(ValueError) as e:
        load_tokenizer(path)
    assert str(e.value) == f"palette file {path}: palette centres must be finite"


# ---- probe features on a full disk or under a file-size limit


def _probe_inputs() -> tuple[GPT, ImageSet, Palette]:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4)).eval()
    images = ImageSet(4, rand_images(96, 4, 4, seed=1), None, np.arange(96) % 2, ["a", "b"], None, "noise")
    palette = Palette(np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3))
    return model, images, palette


CFG = FeatureConfig(batch_size=16, device="cpu", feats_dtype="fp32")


def _extract(cache: Path):
    model, images, palette = _probe_inputs()
    return cached_extract(model, images, palette, CFG, split="train", model_identity={"test": 1}, cache_dir=cache,
                          progress=False)


def _store(cache: Path) -> feature_store.FeatureStore:
    (path,) = cache.glob("feats-train-*")
    model, images, _ = _probe_inputs()
    return feature_store.FeatureStore(path, len(images), model.config.n_embd, list(range(model.config.n_layer + 1)),
                                      "fp32", path.name.split("-")[-1])


@contextlib.contextmanager
def file_size_limit(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_size_limit_while_writing_features_is_one_line_and_nothing_reads_as_complete(tmp_path):
    cache = tmp_path / "probe"
    with file_size_limit(4096), pytest.raises(ValueError) as e:  # a layer file is 96 x 32 x 4 = 12 KiB
        _extract(cache)
    text = str(e.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"no space left writing {cache}/feats-train-"), text
    assert "MB needed" in text
    assert _store(cache).done() is None  # no record: the next run builds the store again
    model, images, palette = _probe_inputs()
    want = extract(model, images, palette, CFG, progress=False)
    got = _extract(cache)
    assert all(np.array_equal(got[layer], want[layer]) for layer in want)


def test_a_full_disk_while_writing_features_keeps_the_rows_before_it_and_continues(tmp_path, monkeypatch):
    cache = tmp_path / "probe"
    calls = []
    fsync = os.fsync

    def full_disk(fd: int) -> None:  # the third batch's rows never reach the disk
        calls.append(fd)
        if len(calls) > 2 * 3:  # 3 layer files, committed after each batch
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(feature_store.os, "fsync", full_disk)
        with pytest.raises(ValueError, match=rf"^no space left writing {cache}/feats-train-\w+: \d+ MB needed "
                                             r"\(\[Errno 28\] No space left on device\)$"):
            _extract(cache)
    assert _store(cache).done() == 32  # two batches of 16 are in; the store is part-way, not complete
    model, images, palette = _probe_inputs()
    want = extract(model, images, palette, CFG, progress=False)
    got = _extract(cache)
    assert all(np.array_equal(got[layer], want[layer]) for layer in want)


# ---- a named pipe in an image folder


def _image_folder(root: Path, classes: tuple[str, ...] = ("a", "b")) -> Path:
    for k, name in enumerate(classes or ("",)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, px in enumerate(rand_images(10, 8, 8, seed=k)):
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow  # runs the command line in a subprocess
def test_a_named_pipe_in_an_image_folder_is_refused_in_one_line(tmp_path):
    data = _image_folder(tmp_path / "classes")
    os.mkfifo(data / "a" / "x.png")  # nothing ever writes to it: a reader would wait forever
    last = error_line(igpt_cli("pretrain", *FLAGS, "--data", str(data), "--max-steps", "2", "--out",
                               str(tmp_path / "run"), timeout=120))
    assert last == (f"igpt pretrain: error: {data / 'a' / 'x.png'} is a named pipe (FIFO), not an image file; "
                    "image folders must hold regular files only: remove it or put the image it stands for in its "
                    "place")
    assert not (tmp_path / "run").exists()
    flat = _image_folder(tmp_path / "flat", ())  # images directly in the folder: one unlabelled split
    os.mkfifo(flat / "y.jpg")
    with pytest.raises(ValueError, match=f"^{flat / 'y.jpg'} is a named pipe"):
        open_split(str(flat), "train", n_px=8)
    with pytest.raises(ValueError, match="is not a regular file"):  # given by name, as to igpt complete
        images_to_pixels(flat / "y.jpg", 8)
    os.unlink(flat / "y.jpg")
    os.mkfifo(flat / "notes")  # not named like an image: ignored, as any other file that is not one
    assert resolve(str(flat)).kind == "folder" and len(open_split(str(flat), "train", n_px=8, val_fraction=0)) == 10


# ---- a stop before the first step


def _signal_in_palette_fit(monkeypatch) -> list[int]:
    """SIGTERM while the run fits its palette (part of the setup before the first step)."""
    reached = []
    fit = Palette.fit.__func__

    def fitting(cls, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
        reached.append(1)  # only when the stop did not end the setup at once
        return fit(cls, *args, **kwargs)

    monkeypatch.setattr(Palette, "fit", classmethod(fitting))
    return reached


def test_a_stop_before_the_first_step_ends_a_new_run_at_once_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    reached = _signal_in_palette_fit(monkeypatch)
    run = tmp_path / "run"
    code = main(["-q", "pretrain", *FLAGS, "--data", "digits", "--max-steps", "3", "--out", str(run)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_STOPPED and not reached
    assert last == (f"igpt pretrain: stopped by SIGTERM before the first step; nothing was trained, so {run} is not "
                    "kept")
    assert not run.exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


def test_a_stop_before_the_first_step_of_a_resume_keeps_the_run_as_it_was(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = ModelConfig.from_preset("igpt-nano")
    cfg = TrainConfig(batch_size=16, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1, ckpt_every=2, device="cpu",
                      workers=0, max_steps=2)
    pretrain(model, cfg, DataConfig(data="digits", vocab_size=16), run, progress=False)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock")
    monkeypatch.setattr(Palette, "load", classmethod(lambda cls, path: signal.raise_signal(signal.SIGTERM)))
    with pytest.raises(Stopped) as e:
        resume(run, changes={"max_steps": 4}, progress=False)
    assert str(e.value) == (f"stopped by SIGTERM before the first step; its checkpoints are as they were; continue "
                            f"with: igpt pretrain --resume {run}")
    after = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".lock")
    assert steps_of(run) == [2]
    assert [f for f in before if "checkpoints" in f[0].parts] == [f for f in after if "checkpoints" in f[0].parts]
