"""Training you can watch: --sample-every grids, the validation loss on the bar, curves.png, the metrics schema
pretraining and fine-tuning share, and --tensorboard refused in one line without its package."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.cli import main
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.tokenizers import Palette
from igpt.train.pretrain import pretrain
from igpt.train.trainer import N_SAMPLES
from igpt.train.rundir import read_metrics
from igpt.viz import grid_table

MODEL = ModelConfig.from_preset("igpt-nano")  # 8x8 images
DATA = DataConfig(data="digits", vocab_size=16)


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=16, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=2, eval_batches=1, log_every=1,
                ckpt_every=4, device="cpu")
    return TrainConfig(**{**base, **kw})


def _losses(run) -> list[tuple[str, int, float]]:
    return [(r["split"], r["step"], r["loss"]) for r in read_metrics(run)]


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_sample_every_writes_seeded_grids_and_leaves_training_unchanged(tmp_path, objective, capsys):
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    pretrain(MODEL, _cfg(objective=objective), DATA, plain, progress=False)
    pretrain(MODEL, _cfg(objective=objective, sample_every=2), DATA, watched, progress=True)
    assert _losses(watched) == _losses(plain)  # sampling draws from its own generator, not the training RNG
    assert "val_loss=" in capsys.readouterr().err  # the validation loss is on the progress bar
    grids = sorted(p.name for p in (watched / "samples").iterdir())
    assert grids == ["step-0000002.png", "step-0000004.png"] and not (plain / "samples").exists()
    # 16 samples, 4 to a row, enlarged 16x (8x8 images shown at 128 pixels), under a title
    blank = np.zeros((N_SAMPLES, 8, 8, 3), np.uint8)
    layout = grid_table(blank, ncol=4, scale=16, pad=2, title="x")
    first, last = (Image.open(watched / "samples" / g).convert("RGB") for g in grids)
    assert first.size[1] == layout.image.size[1] and first.size[0] >= layout.image.size[0]
    cells = [[layout.cell(r, c, img) for r in range(4) for c in range(4)] for img in (first, last)]
    big = np.asarray(first)
    top, left = layout.boxes[0][0]
    assert np.array_equal(big[top:top + 128, left:left + 128], cells[0][0].repeat(16, 0).repeat(16, 1))  # crisp
    palette = Palette.load(watched / "palette.npz")
    colours = {tuple(c) for c in palette.decode(torch.arange(palette.k)).reshape(-1, 3).tolist()}
    assert all(tuple(p) in colours for c in cells[1] for p in c.reshape(-1, 3).tolist())  # palette colours only
    assert len({c.tobytes() for c in cells[0]}) > 1  # the samples differ from one another
    assert (watched / "curves.png").is_file() and (plain / "curves.png").is_file()


def test_metrics_share_one_schema_and_old_finetune_lines_still_read(tmp_path):
    run = tmp_path / "run"
    pretrain(MODEL, _cfg(max_steps=2), DATA, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("val", 2)]
    assert all(isinstance(r["loss"], float) for r in records)
    assert {"bits", "lr", "grad_norm", "img_per_s"} <= records[0].keys() and {"bits", "images"} <= records[2].keys()
    # a fine-tune's metrics.jsonl of an earlier version: one "val" line per evaluation
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text(json.dumps({"step": 50, "split": "val", "lr": 1e-3, "val_acc": 0.5,
                                                   "loss": 2.0, "clf": 1.5, "gen": 0.5}) + "\n")
    assert read_metrics(old) == [
        {"split": "train", "step": 50, "loss": 2.0, "clf_loss": 1.5, "gen_loss": 0.5, "lr": 1e-3},
        {"split": "val", "step": 50, "acc": 0.5}]


def test_tensorboard_without_the_package_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails, as without the package
    with pytest.raises(ValueError, match="pip install"):
        pretrain(MODEL, _cfg(tensorboard=True), DATA, tmp_path / "api", progress=False)
    assert not (tmp_path / "api").exists()
    args = ["pretrain", "--preset", "igpt-nano", "--data", "digits", "--vocab-size", "16", "--max-steps", "1",
            "--device", "cpu", "--tensorboard", "--out", str(tmp_path / "cli")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tensorboard needs the tensorboard package" in err
    assert not (tmp_path / "cli").exists()


def test_sample_every_grids_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    pretrain(MODEL, _cfg(max_steps=2, sample_every=2, tensorboard=True), DATA, run, progress=False)
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Images("samples")] == [2]
    assert [e.step for e in acc.Scalars("val/loss")] == [2]
