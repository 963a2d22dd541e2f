from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.train.optim import pretrain_lr as lr_at, warmup_steps
from igpt.train.pretrain import pretrain, resume

MODEL = ModelConfig.from_preset("igpt-nano")
DATA = DataConfig(data="digits", vocab_size=16)


def train_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=16, max_steps=8, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                log_every=1, ckpt_every=3, keep_last=5, device="cpu")
    return TrainConfig(**{**base, **kw})


def losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == split}


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = TrainConfig(lr=1.0, max_steps=110, warmup_steps=10)
    assert lr_at(0, cfg, 10) == pytest.approx(0.1)
    assert lr_at(9, cfg, 10) == pytest.approx(1.0)
    assert lr_at(60, cfg, 10) == pytest.approx(0.5)
    assert lr_at(110, cfg, 10) == pytest.approx(0.0)
    assert warmup_steps(TrainConfig(batch_size=10, max_steps=1000), n_train=250) == 25  # one epoch
    assert warmup_steps(TrainConfig(batch_size=10, max_steps=100), n_train=250) == 10  # capped at 10%


KILL_SCRIPT = """
import os, signal, sys
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.train.pretrain import pretrain
cfg = TrainConfig(**{cfg!r})
def on_step(step, metrics):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as a crash or OOM kill
model = ModelConfig.from_preset("igpt-nano", dropout={dropout})
pretrain(model, cfg, DataConfig(data="digits", vocab_size=16), sys.argv[1], progress=False, on_step=on_step)
"""


@pytest.mark.slow  # kills training in a subprocess, then resumes
@pytest.mark.parametrize("objective,accum,dropout", [("ar", 1, 0.0), ("bert", 2, 0.0), ("ar", 1, 0.1)])
def test_sigkilled_run_resumes_with_identical_loss_curve(tmp_path, objective, accum, dropout):
    cfg = train_cfg(objective=objective, grad_accum=accum)
    pretrain(replace(MODEL, dropout=dropout), cfg, DATA, tmp_path / "straight", progress=False)

    killed = tmp_path / "killed"
    script = textwrap.dedent(KILL_SCRIPT).format(cfg=cfg.to_dict(), kill_at=5, dropout=dropout)
    proc = subprocess.run([sys.executable, "-c", script, str(killed)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(losses(killed)) == 5  # it really died mid-run, after the step-3 checkpoint
    resume(killed, progress=False)

    assert losses(killed) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)
    assert sorted(losses(killed)) == list(range(1, 9))
    assert losses(killed, "val") == pytest.approx(losses(tmp_path / "straight", "val"), rel=1e-6)


def test_training_lowers_loss_and_keeps_last_checkpoints(tmp_path):
    result = pretrain(MODEL, train_cfg(max_steps=12, keep_last=2), DATA, tmp_path / "run", progress=False)
    curve = losses(tmp_path / "run")
    assert curve[1] == pytest.approx(math.log(16), abs=1e-4)  # zero-initialised head: uniform over 16 ids
    assert curve[12] < curve[1] - 0.3
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000009", "step-0000012"]
    assert result["checkpoint"].endswith("step-0000012")


def test_refuses_to_overwrite_a_run(tmp_path):
    pretrain(MODEL, train_cfg(max_steps=3), DATA, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(MODEL, train_cfg(max_steps=3), DATA, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="not an igpt run directory"):
        resume(tmp_path / "nothing-here", progress=False)


def test_pixel_augmentation_and_bf16_autocast_run(tmp_path):
    cfg = train_cfg(max_steps=2, augment="cifar", dtype="bf16", eval_every=0)
    result = pretrain(MODEL, cfg, DATA, tmp_path / "run", progress=False)
    assert math.isfinite(result["train"]["loss"]) and "val" not in result


@pytest.mark.slow  # pretrains on real CIFAR-10 images
def test_real_cifar_pretraining_lowers_validation_loss(tmp_path):
    """A couple of minutes of CPU pretraining on real CIFAR-10 images (16x16) takes the validation loss far
    below the uniform ln 512 = 6.24 nats/token."""
    from conftest import shared_file

    data = str(shared_file("cifar10-small.npz"))
    model = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_px=16)
    cfg = TrainConfig(batch_size=32, max_steps=150, lr=3e-3, warmup_steps=10, eval_every=150, eval_batches=8,
                      ckpt_every=150, device="cpu")
    torch.set_num_threads(2)
    result = pretrain(model, cfg, DataConfig(data=data), tmp_path / "run", progress=False)
    assert result["val"]["loss"] < math.log(512) - 2.0, result["val"]


@pytest.mark.slow  # trains with loader workers
def test_imagenet_style_augmentation_streams_an_image_folder_and_resumes(tmp_path):
    """--augment imagenet decodes and augments folder images in loader workers; the stream position is
    part of the checkpoint, so a resumed run continues with the same batches."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 64 * 64  # few colours
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    data = DataConfig(data=str(tmp_path / "imgs"), vocab_size=16, val_fraction=0.2)
    cfg = train_cfg(augment="imagenet", workers=0, max_steps=4, ckpt_every=2, eval_every=2)
    straight = pretrain(MODEL, cfg, data, tmp_path / "a", progress=False)
    assert straight["val"]["images"] == 5  # 20% of 24 carved, centre-cropped
    # the first two steps are warm-up, whose learning rate does not depend on max_steps
    pretrain(MODEL, replace(cfg, max_steps=2), data, tmp_path / "b", progress=False)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    run["train"]["max_steps"] = 4
    (tmp_path / "b" / "run.json").write_text(json.dumps(run))
    resume(tmp_path / "b", progress=False)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-6)
    pretrain(MODEL, replace(cfg, workers=2), data, tmp_path / "c", progress=False)  # decoded in 2 processes
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "a"), rel=1e-6)


def test_tensorboard_logging_or_a_clear_error(tmp_path):
    cfg = train_cfg(max_steps=2, tensorboard=True, eval_every=0)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            pretrain(MODEL, cfg, DATA, tmp_path / "run", progress=False)
        return
    pretrain(MODEL, cfg, DATA, tmp_path / "run", progress=False)
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_compile_setting_auto_is_off_on_cpu_and_old_run_files_still_read():
    from igpt.runtime import compile_enabled

    cpu = torch.device("cpu")
    assert not compile_enabled("auto", cpu) and compile_enabled("on", cpu) and not compile_enabled("off", cpu)
    assert TrainConfig.from_dict({"compile": True}).compile == "on"  # run.json of earlier versions: a bool
    assert TrainConfig.from_dict({"compile": False}).compile == "off"
    with pytest.raises(ValueError, match="--compile"):
        TrainConfig(compile="sometimes")


@pytest.mark.slow  # trains, then resumes
def test_resume_on_another_device_applies_the_change_before_checking_it(tmp_path):
    run = tmp_path / "run"
    pretrain(MODEL, train_cfg(max_steps=2), DATA, run, progress=False)
    recorded = json.loads((run / "run.json").read_text())
    recorded["train"]["device"] = "cuda:7"  # as if the run had started on a machine with eight GPUs
    (run / "run.json").write_text(json.dumps(recorded))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device 'cuda:7'"):
            resume(run, progress=False)
    resume(run, changes={"device": "cpu", "max_steps": 3}, progress=False)
    assert max(losses(run)) == 3
    assert json.loads((run / "run.json").read_text())["train"]["device"] == "cpu"
