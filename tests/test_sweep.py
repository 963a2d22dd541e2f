from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import rand_images
from PIL import Image

from igpt.cli import main
from igpt.config import DataConfig, FeatureConfig, ModelConfig, ProbeConfig, TrainConfig
from igpt.eval.sweep import sweep_checkpoints
from igpt.tokenizers import Palette
from igpt.train.pretrain import pretrain
from igpt.weights.checkpoint import prune_checkpoints, step_checkpoints

PROBE = ProbeConfig(l2=1e-2, max_iter=20)
FEATS = FeatureConfig(device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 12-step run that keeps every 4th step's checkpoint (ckpt-every 100, keep-last 1), and labelled data."""
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 48), rng.integers(0, 3, 24)
    np.savez(root / "data.npz", x_train=rand_images(48, 8, 8, 1), y_train=y_train.astype(np.uint8),
             x_test=rand_images(24, 8, 8, 2), y_test=y_test.astype(np.uint8))
    Palette(np.linspace(-1, 1, 48).reshape(16, 3)).save(root / "palette.npz")
    cfg = TrainConfig(batch_size=8, max_steps=12, lr=1e-2, eval_every=0, ckpt_every=100, keep_last=1, keep_every=4,
                      log_every=4, device="cpu")
    pretrain(ModelConfig.from_preset("igpt-nano"), cfg,
             DataConfig(data=str(root / "data.npz"), tokenizer=str(root / "palette.npz")), root / "run", progress=False)
    return root


def test_keep_every_keeps_every_nth_steps_checkpoint_beside_keep_last(run, tmp_path):
    assert [p.name for p in step_checkpoints(run / "run")] == ["step-0000004", "step-0000008", "step-0000012"]
    for step in (3, 5, 6, 10, 11):  # checkpoints keep-every does not keep: only the newest keep-last survive
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:07d}" / "config.json").write_text("{}")
    prune_checkpoints(tmp_path, keep_last=1, keep_every=5)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0000005", "step-0000010", "step-0000011"]
    prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0000011"]
    with pytest.raises(ValueError, match="--keep-every must be >= 0"):
        TrainConfig(keep_every=-1)


def test_sweep_scores_and_probes_every_kept_checkpoint_and_resumes(run, tmp_path):
    data, out = str(run / "data.npz"), tmp_path / "sweep"
    result = sweep_checkpoints(run / "run", data, out, PROBE, FEATS, progress=False)
    assert [r["step"] for r in result["rows"]] == [4, 8, 12] and result["skipped"] == []  # none left out
    assert result["split"] == "val"  # the run's own validation carve
    for r in result["rows"]:
        score = json.loads((out / f"step-{r['step']:07d}" / "score.json").read_text())
        metrics = json.loads((out / f"step-{r['step']:07d}" / "metrics.json").read_text())
        assert r["val_loss"] == score["nats_per_token"] > 0 and r["best_acc"] == metrics["best_test_acc"]
        assert r["best_layer"] == metrics["best_layer"] and metrics["checkpoint"].endswith(f"step-{r['step']:07d}")
    assert json.loads((out / "sweep.json").read_text())["rows"] == result["rows"]
    with open(out / "sweep.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [4, 8, 12]
    assert Image.open(out / "sweep.png").size[0] > 300

    (out / "step-0000008" / "score.json").unlink()  # as an interrupted sweep leaves it
    again = sweep_checkpoints(run / "run", data, out, PROBE, FEATS, progress=False)
    assert again["skipped"] == [4, 12] and again["rows"] == result["rows"]
    with pytest.raises(ValueError, match="another checkpoint, data or probe setting; pass --overwrite"):
        sweep_checkpoints(run / "run", data, out, ProbeConfig(l2=1e-1, max_iter=20), FEATS, progress=False)


def test_sweep_refuses_a_run_without_kept_checkpoints_and_a_single_checkpoint(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no kept checkpoints"):
        sweep_checkpoints(tmp_path / "empty", str(run / "data.npz"), tmp_path / "o", PROBE, FEATS, progress=False)
    one = step_checkpoints(run / "run")[0]
    with pytest.raises(ValueError, match="is one checkpoint"):
        sweep_checkpoints(one, str(run / "data.npz"), tmp_path / "o", PROBE, FEATS, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_probe_all_checkpoints(run, tmp_path, capsys):
    args = ["probe", "--checkpoint", str(run / "run"), "--data", str(run / "data.npz"), "--out", str(tmp_path / "s"),
            "--all-checkpoints", "--l2", "1e-2", "--max-iter", "20", "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "3 checkpoints" in text and (tmp_path / "s" / "sweep.png").exists()
    assert main(args + ["--attentive"]) == 2
    assert "--attentive probes one checkpoint" in capsys.readouterr().err
    assert main(args[:2] + [str(tmp_path / "nothing")] + args[3:]) == 2
    assert "no such run directory" in capsys.readouterr().err
