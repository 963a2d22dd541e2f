"""Streamed features: layer selection, the on-disk store, resume after a stop, stale and damaged caches, the
disk and memory plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from igpt.cli import main
from igpt.config import FeatureConfig, ProbeConfig
from igpt.data.imageset import ImageSet
from igpt.eval import features
from igpt.eval.features import cached_extract, extract, feature_plan, parse_layers
from igpt.eval.probe_run import probe_checkpoint
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.stop import GracefulStop, Stopped
from igpt.weights.checkpoint import save_checkpoint


@pytest.fixture
def images(nano_config) -> ImageSet:
    ids = np.random.default_rng(0).integers(0, nano_config.n_vocab, (23, nano_config.n_ctx)).astype(np.uint16)
    return ImageSet(nano_config.n_px, None, ids, np.arange(23) % 3, None, None, "synthetic")


@pytest.fixture
def palette(nano_config) -> Palette:
    return Palette(np.linspace(-1, 1, 3 * nano_config.n_vocab).reshape(-1, 3))


CFG = FeatureConfig(device="cpu", batch_size=5, feats_dtype="fp32")


def _store(tmp_path):
    (path,) = tmp_path.glob("feats-test-*")
    return path


def _extract(model, images, palette, tmp_path, cfg=CFG, identity=None, layers=None):
    return cached_extract(model, images, palette, cfg, split="test", model_identity=identity or {"name": "nano"},
                          cache_dir=tmp_path, layers=layers, progress=False)


def test_layers_are_parsed_and_an_entry_outside_the_model_is_named():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("0,3", 4) == [0, 3] and parse_layers("1-3", 4) == [1, 2, 3]
    assert parse_layers("4, 0-1,1", 4) == [0, 1, 4]
    for spec, words in (("0,9", "layer 9"), ("2-7", "layer 7"), ("a", "'a'"), ("3-1", "empty"), ("-1", "'-1'")):
        with pytest.raises(ValueError, match=words) as info:
            parse_layers(spec, 4)
        assert str(info.value).startswith("--layers") and "\n" not in str(info.value)


def test_stored_features_equal_the_in_memory_ones_layer_by_layer(tmp_path, nano_model, images, palette):
    memory = extract(nano_model, images, palette, CFG, progress=False)
    stored = _extract(nano_model, images, palette, tmp_path, layers=[0, 2])
    assert list(stored) == [0, 2]
    for layer in stored:
        x = stored[layer]
        assert isinstance(x, np.memmap) and x.dtype == np.float32 and x.shape == (23, 32)
        np.testing.assert_allclose(x, memory[layer], rtol=1e-6, atol=1e-6)
    half = _extract(nano_model, images, palette, tmp_path / "h", cfg=FeatureConfig(device="cpu", batch_size=5))
    assert half[1].dtype == np.float16  # the default: half the disk
    np.testing.assert_allclose(half[1], memory[1], rtol=2e-3, atol=2e-3)
    record = json.loads((_store(tmp_path) / "progress.json").read_text())
    assert record["done"] == 23 and record["layers"] == [0, 2]


class _StopAfter(GracefulStop):
    """A GracefulStop that a signal 'reaches' after ``checks`` batches."""

    checks = 2

    @property
    def requested(self) -> bool:
        _StopAfter.checks -= 1
        if _StopAfter.checks < 0:
            self.signal_name = "SIGTERM"
        return bool(self.signal_name)


def test_a_stopped_extraction_resumes_where_it_stopped(tmp_path, nano_model, images, palette, monkeypatch):
    whole = extract(nano_model, images, palette, CFG, progress=False)
    _StopAfter.checks = 2
    monkeypatch.setattr(features, "GracefulStop", _StopAfter)
    with pytest.raises(Stopped, match="after 10 of 23 images"):
        _extract(nano_model, images, palette, tmp_path)
    assert json.loads((_store(tmp_path) / "progress.json").read_text())["done"] == 10
    monkeypatch.undo()
    starts = []
    batches = features._batches

    def spy(model, images, palette, cfg, layers, start, mask_index):
        starts.append(start)
        return batches(model, images, palette, cfg, layers, start, mask_index)

    monkeypatch.setattr(features, "_batches", spy)
    resumed = _extract(nano_model, images, palette, tmp_path)
    assert starts == [10]  # continued, not started again
    for layer in whole:
        np.testing.assert_allclose(resumed[layer], whole[layer], rtol=1e-6, atol=1e-6)
    # a kill between a batch's write and its record: the record still says 10, and the rows after it are
    # written again (the same values), never read as done


def test_a_killed_extraction_is_never_read_as_complete(tmp_path, nano_model, images, palette, monkeypatch):
    commits = []
    commit = features.FeatureStore.commit

    def killed(self, done):
        if len(commits) == 2:
            raise KeyboardInterrupt  # the process dies before the third record is written
        commits.append(done)
        commit(self, done)

    monkeypatch.setattr(features.FeatureStore, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        _extract(nano_model, images, palette, tmp_path)
    monkeypatch.undo()
    assert json.loads((_store(tmp_path) / "progress.json").read_text())["done"] == 10
    whole = extract(nano_model, images, palette, CFG, progress=False)
    again = _extract(nano_model, images, palette, tmp_path)
    np.testing.assert_allclose(again[2], whole[2], rtol=1e-6, atol=1e-6)


def test_stale_truncated_or_foreign_caches_are_rebuilt(tmp_path, nano_model, images, palette, monkeypatch):
    first = np.array(_extract(nano_model, images, palette, tmp_path)[1])
    path = _store(tmp_path)
    # another checkpoint (its identity) or other data: another key, another store
    _extract(nano_model, images, palette, tmp_path, identity={"name": "other weights"})
    changed = ImageSet(images.n_px, None, images.ids.copy(), images.labels, None, None, "x")
    changed.ids[3, 0] = (changed.ids[3, 0] + 1) % 16
    _extract(nano_model, changed, palette, tmp_path)
    assert len(list(tmp_path.glob("feats-test-*"))) == 3
    ran = []
    batches = features._batches
    monkeypatch.setattr(features, "_batches", lambda *a: ran.append(1) or batches(*a))
    # a truncated layer file: detected from its size, extracted again
    layer_file = path / "layer_1.npy"
    layer_file.write_bytes(layer_file.read_bytes()[:-40])
    rebuilt = _extract(nano_model, images, palette, tmp_path)
    assert ran and layer_file.stat().st_size > 40 * 23
    np.testing.assert_array_equal(rebuilt[1], first)
    # a progress record of other inputs (another key, other layers) is not trusted either
    ran.clear()
    record = json.loads((path / "progress.json").read_text())
    (path / "progress.json").write_text(json.dumps({**record, "key": "0" * 16}))
    _extract(nano_model, images, palette, tmp_path)
    assert ran
    # --no-cache recomputes even a complete store
    ran.clear()
    _extract(nano_model, images, palette, tmp_path, cfg=FeatureConfig(device="cpu", batch_size=5,
                                                                       feats_dtype="fp32", cache=False))
    assert ran


def test_feature_plan_counts_disk_and_memory():
    from igpt.config import ModelConfig

    s = ModelConfig.from_preset("igpt-s")
    plan = feature_plan(s, {"train_all": 50_000, "test": 10_000}, feats_dtype="fp16")
    assert plan["disk_bytes"] == 60_000 * 512 * 25 * 2  # N x D x (L + 1) layers x 2 bytes
    lbfgs = plan["probe_bytes"]
    assert lbfgs == 4 * 512 * 3 * 60_000
    sgd = feature_plan(s, {"train_all": 50_000, "test": 10_000}, lbfgs=False)["probe_bytes"]
    assert sgd < lbfgs / 10  # streamed: the test split once, not the fitting matrix
    # the test split, four minibatches, and the preconditioner's D x D second moment and eigenvectors
    assert sgd == 4 * 512 * (10_000 + 4 * 256) + 24 * 512 ** 2
    wide = feature_plan(s, {"train_all": 50_000, "test": 10_000}, lbfgs=False, concat=5)["probe_bytes"]
    assert wide == 4 * 2560 * (10_000 + 4 * 256) + 24 * 2560 ** 2


def test_probe_errors_come_before_any_extraction(tmp_path, nano_model, nano_config, capsys):
    palette = Palette(np.linspace(-1, 1, 3 * nano_config.n_vocab).reshape(-1, 3))
    ckpt = save_checkpoint(tmp_path / "ckpt", nano_model, palette, CheckpointRecord(nano_config, palette.fingerprint()))
    n = 40
    pixels = np.random.default_rng(1).integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    labels = np.r_[np.zeros(n - 3, np.int64), np.ones(3, np.int64)]  # class 1 has 3 training images
    np.savez(tmp_path / "d.npz", x_train=pixels, y_train=labels, x_test=pixels[:6], y_test=labels[-6:])
    out = tmp_path / "p"
    with pytest.raises(ValueError, match="class 1 has only 3"):
        probe_checkpoint(ckpt, str(tmp_path / "d.npz"), out, ProbeConfig(labels_per_class=5), progress=False)
    assert not list(out.glob("feats-*"))
    code = main(["probe", "--checkpoint", str(ckpt), "--data", str(tmp_path / "d.npz"), "--out", str(out),
                 "--layers", "0,5", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "layer 5" in err and len(err.splitlines()) == 1 and not list(out.glob("feats-*"))
    with pytest.raises(ValueError, match="test label 2 never occurs"):
        from igpt.eval.probe import check_labels
        check_labels(labels, np.array([0, 2]))
    with pytest.raises(ValueError, match="out of range"):
        check_labels(np.array([0, -1]), np.array([0]))


def _labelled_npz(path, n=40, seed=1):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pixels = (rng.integers(0, 120, (n, 4, 4, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    np.savez(path, x_train=pixels, y_train=labels, x_test=pixels[:10], y_test=labels[:10])
    return str(path)


def test_bert_probe_reads_the_checkpoint_mask_rate_and_votes_over_masks(tmp_path, nano_model, nano_config):
    palette = Palette(np.linspace(-1, 1, 3 * nano_config.n_vocab).reshape(-1, 3))
    nano_model.causal = False
    record = CheckpointRecord(nano_config, palette.fingerprint(), "bert", mask_prob=0.4)
    ckpt = save_checkpoint(tmp_path / "bert", nano_model, palette, record)
    data = _labelled_npz(tmp_path / "d.npz")
    cfg = ProbeConfig(l2=1e-2, max_iter=20, baseline=True)
    voted = probe_checkpoint(ckpt, data, tmp_path / "v", cfg, FeatureConfig(device="cpu", layers="1-2", n_masks=3,
                                                                           mask_combine="vote"), progress=False)
    assert voted["features"]["mask_prob"] == 0.4  # -1: the rate the checkpoint records, not 0.15
    # per model (trained, random init): one train store read under mask 0, three test stores (masks 0, 1, 2)
    assert len(list((tmp_path / "v").glob("feats-train_all-*"))) == 2
    assert len(list((tmp_path / "v").glob("feats-test-*"))) == 6
    assert set(voted["probes"]) == {"linear", "linear, random init"} and voted["layers_probed"] == [1, 2]
    mean = probe_checkpoint(ckpt, data, tmp_path / "m", ProbeConfig(l2=1e-2, max_iter=20),
                            FeatureConfig(device="cpu", layers="2", n_masks=3), progress=False)
    assert len(list((tmp_path / "m").glob("feats-test-*"))) == 1  # the mean over masks: one store
    assert set(mean["probes"]["linear"]["layers"]) == {2}
