from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize

from igpt.cli import main
from igpt.config import AttentiveConfig, ModelConfig
from igpt.data.imageset import ImageSet
from igpt.eval.attentive import AttentiveHead, attentive_probe
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.weights.checkpoint import save_checkpoint

CFG = AttentiveConfig(attentive_epochs=4, attentive_lr="3e-3,1e-3", attentive_batch_size=32, attentive_heads=2)


def _toy(n: int, seed: int) -> ImageSet:
    """Three classes of 4x4 images told apart by which third of a 15-colour palette their ids come from."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    ids = (labels[:, None] * 5 + rng.integers(0, 5, (n, 16))).astype(np.uint16)
    return ImageSet(4, None, ids, labels.astype(np.int64), None, None, "toy")


@pytest.fixture
def trunk() -> tuple[GPT, Palette]:
    torch.manual_seed(0)
    model = randomize(GPT(ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4))).eval()
    return model, Palette(np.linspace(-1, 1, 48).reshape(16, 3))


def test_attentive_head_learns_a_separable_problem_and_leaves_the_trunk_frozen(trunk):
    model, palette = trunk
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    result = attentive_probe(model, palette, _toy(240, 0), _toy(90, 1), [1, 2], CFG, val_fraction=0.2, seed=0)
    assert set(result) == {1, 2}
    for r in result.values():
        assert r["test_acc"] > 0.9 and r["val_acc"] > 0.9, result
        assert r["lr"] in CFG.lrs and 1 <= r["epoch"] <= CFG.attentive_epochs
        assert set(r["val_curves"]) == {str(lr) for lr in CFG.lrs}
        assert r["val_acc"] == max(max(c) for c in r["val_curves"].values())  # chosen on validation
    for name, p in model.state_dict().items():  # no gradient and no update reached the trunk
        assert torch.equal(p, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the heads' seeded init leaves the caller's RNG alone


def test_attentive_probe_is_at_chance_on_shuffled_labels(trunk):
    model, palette = trunk
    train, test = _toy(240, 0), _toy(150, 1)
    train.labels = np.random.default_rng(3).permutation(train.labels)
    result = attentive_probe(model, palette, train, test, [2], CFG, val_fraction=0.2, seed=0)
    assert result[2]["test_acc"] < 0.6  # three classes: chance is 1/3; learnt labels would give > 0.9


def test_attentive_head_reads_tokens_not_their_mean():
    """Attention pools a set (permuting the tokens leaves the logits alone), and unlike a linear map of the
    mean it tells apart two sets with the same mean."""
    torch.manual_seed(0)
    head = AttentiveHead(8, 3, 2).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = head(x)
        assert torch.allclose(head(x[:, torch.randperm(5)]), out, atol=1e-5)
        y = x.clone()
        d = 2 * torch.randn(2, 8)
        y[:, 0] += d
        y[:, 1] -= d  # the same mean over tokens
        assert not torch.allclose(head(y), out, atol=1e-3)
    with pytest.raises(ValueError, match="--attentive-heads 3"):
        AttentiveHead(8, 3, 3)


def test_bad_attentive_flags_and_layers(trunk):
    model, palette = trunk
    for kw, match in (({"attentive_lr": "fast"}, "--attentive-lr"), ({"attentive_lr": "0"}, "--attentive-lr"),
                      ({"attentive_layers": "x"}, "--attentive-layers"),
                      ({"attentive_epochs": 0}, "--attentive-epochs")):
        with pytest.raises(ValueError, match=match):
            AttentiveConfig(**kw)
    with pytest.raises(ValueError, match="outside this model's layers 0..2"):
        AttentiveConfig(attentive_layers="1,5").layers(2, None)
    assert AttentiveConfig(attentive_layers="all").layers(2, None) == [0, 1, 2]
    assert AttentiveConfig().layers(2, 1) == [1]
    with pytest.raises(ValueError, match="no validation images"):
        attentive_probe(model, palette, _toy(30, 0), _toy(9, 1), [1], CFG, val_fraction=0.0)


def test_cli_probe_attentive_reports_beside_the_linear_probe(trunk, tmp_path, capsys):
    model, palette = trunk
    record = CheckpointRecord(model.config, palette.fingerprint(), "ar", step=0)
    save_checkpoint(tmp_path / "ckpt", model, palette, record)
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 60), rng.integers(0, 3, 30)

    def pixels(y: np.ndarray) -> np.ndarray:
        return np.clip(y[:, None, None, None] * 100 + rng.integers(0, 40, (len(y), 4, 4, 3)), 0, 255).astype(np.uint8)

    np.savez(tmp_path / "toy.npz", x_train=pixels(y_train), y_train=y_train.astype(np.uint8), x_test=pixels(y_test),
             y_test=y_test.astype(np.uint8))
    out = tmp_path / "probe"
    ckpt, data = str(tmp_path / "ckpt"), str(tmp_path / "toy.npz")
    assert main(["probe", "--checkpoint", ckpt, "--data", data, "--out", str(out),
                 "--l2", "1e-2", "--max-iter", "30", "--device", "cpu", "--attentive", "--attentive-epochs", "2",
                 "--attentive-lr", "1e-3", "--attentive-batch-size", "16", "--attentive-heads", "2"]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    best = str(m["best_layer"])
    assert set(m["probes"]["attentive"]["layers"]) == {str(best)} and m["attentive_config"]["attentive_epochs"] == 2
    assert "attentive acc" in text and f"attentive probe on layer {best}: test accuracy" in text
    assert set(m["probes"]["linear"]["layers"]) == {"0", "1", "2"}  # the linear probe's results stay beside it
    assert (out / "probe.png").is_file()  # redrawn with the attentive curve
    code = main(["probe", "--checkpoint", ckpt, "--data", data, "--out", str(tmp_path / "bad"), "--attentive",
                 "--attentive-lr", "-1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--attentive-lr" in err
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_sigterm_stops_the_attentive_probe_between_batches(trunk, monkeypatch):
    import signal

    from igpt.eval import attentive
    from igpt.stop import Stopped

    model, palette = trunk
    calls = []
    states = attentive._Trunk.states

    def signalled(self, *args):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # as a cluster would, mid-epoch; handled before it returns
        return states(self, *args)

    monkeypatch.setattr(attentive._Trunk, "states", signalled)
    with pytest.raises(Stopped, match="stopped by SIGTERM in epoch 1 of 4"):
        attentive_probe(model, palette, _toy(240, 0), _toy(90, 1), [1], CFG, val_fraction=0.2)
    assert len(calls) == 2  # the batch under way finished; no other began
