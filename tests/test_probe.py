from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from igpt.cli import main
from igpt.config import FeatureConfig, ProbeConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import lossless_mask, open_labelled
from igpt.data.splits import balanced_subset, stratified_carve
from igpt.eval.features import cached_extract, extract
from igpt.eval.probe import concat_layers, fit_logistic, logistic_probe, probe_features
from igpt.eval.probe_run import probe_checkpoint
from igpt.model import GPT
from igpt.objectives import sample_keep_mask
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.runtime import derived_generator
from igpt.weights.checkpoint import save_checkpoint
from igpt.weights.convert import load as load_checkpoint


def _clusters(n: int, d: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, d)) * 4
    y = rng.integers(0, classes, n)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


# ---------------------------------------------------------------------------------------------- the probe


def test_probe_separates_separable_features_and_is_at_chance_on_shuffled_labels():
    x, y = _clusters(600, 16, 5, 0.5, seed=0)
    xt, yt = _clusters(400, 16, 5, 0.5, seed=1)
    result = logistic_probe(x, y, xt, yt)
    assert result["test_acc"] == 1.0 and result["val_acc"] == 1.0
    # Shuffled labels on features without cluster structure (so that test predictions are not tied to a few
    # cluster-level guesses): the probe learns nothing that transfers, and scores chance on true test labels.
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 5))
    x, xt = rng.normal(size=(1000, 16)), rng.normal(size=(2000, 16))
    y, yt = (x @ w).argmax(1), (xt @ w).argmax(1)
    assert logistic_probe(x, y, xt, yt)["test_acc"] > 0.9
    shuffled = logistic_probe(x, rng.permutation(y), xt, yt)
    assert abs(shuffled["test_acc"] - 0.2) < 0.05  # 5 classes: chance is 20%


def test_fit_logistic_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y = _clusters(300, 6, 3, 3.0, seed=2)
    l2 = 1e-2
    x = x.astype(np.float64)
    w, b = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 3, l2, max_iter=2000, tolerance=1e-14)
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-12, max_iter=10000).fit(x, y)
    ours = torch.softmax(torch.from_numpy(x) @ w + b, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=1e-5)
    ref2 = LogisticRegression(C=2 / (l2 * len(x)), tol=1e-12, max_iter=10000).fit(x, y)  # a factor 2 shows
    assert np.abs(ref2.predict_proba(x) - ours).max() > 1e-3


def test_l2_is_chosen_on_validation_and_fixed_l2_skips_the_search():
    x, y = _clusters(400, 40, 4, 6.0, seed=3)  # noisy: the strength matters
    xt, yt = _clusters(200, 40, 4, 6.0, seed=4)
    searched = logistic_probe(x, y, xt, yt, ProbeConfig(l2_grid="1e-5,1e-2,10"))
    assert searched["l2"] in (1e-5, 1e-2, 10.0) and 0.4 < searched["test_acc"] <= 1
    fixed = logistic_probe(x, y, xt, yt, ProbeConfig(l2=0.5))
    assert fixed["l2"] == 0.5
    with pytest.raises(ValueError, match="l2-grid"):
        ProbeConfig(l2_grid="1e-3,abc")
    with pytest.raises(ValueError, match="fixed --l2"):
        logistic_probe(x[:4], np.arange(4), xt, yt % 4)  # one image per class: nothing to validate on


def test_carve_and_low_data_subsets_are_balanced_and_seeded():
    labels = np.repeat(np.arange(5), 30)[np.random.default_rng(0).permutation(150)]
    fit, val = stratified_carve(labels, 0.2, seed=0)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == 150
    assert np.all(np.bincount(labels[val]) == 6)
    a, b, c = (balanced_subset(labels, 4, [0, r]) for r in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.bincount(labels[a]) == 4) and len(np.unique(a)) == 20
    with pytest.raises(ValueError, match="only 30"):
        balanced_subset(labels, 31, 0)


def test_every_layer_best_marked_concat_and_low_data_mean_std():
    x, y = _clusters(500, 8, 4, 2.0, seed=5)
    xt, yt = _clusters(300, 8, 4, 2.0, seed=6)
    noise = np.random.default_rng(7)
    feats = {l: x + noise.normal(size=x.shape).astype(np.float32) * 3 * abs(l - 2) for l in range(5)}
    tfeats = {l: xt + noise.normal(size=xt.shape).astype(np.float32) * 3 * abs(l - 2) for l in range(5)}
    lossless = np.arange(300) < 100
    m = probe_features(feats, y, tfeats, yt, ProbeConfig(concat=3), subsets={"lossless": lossless, "all": None})
    assert m["best_layer"] == 2 and m["concat"]["layers"] == [1, 2, 3]
    first = m["layers"][0]
    assert set(first["accs"]) == {"lossless", "all"} and first["test_acc"] == first["accs"]["lossless"]
    low = probe_features(feats, y, tfeats, yt, ProbeConfig(labels_per_class=5, repeats=3))
    assert len(low["layers"][2]["runs"]) == 3 and low["layers"][2]["std"] >= 0
    assert all(len(s) == 20 for s in low["subsets"])
    assert concat_layers(0, 9, 5) == [0, 1, 2, 3, 4] and concat_layers(8, 9, 5) == [4, 5, 6, 7, 8]
    assert concat_layers(2, 3, 5) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- features


@pytest.fixture
def nano_images(nano_config) -> ImageSet:
    ids = np.random.default_rng(0).integers(0, nano_config.n_vocab, (7, nano_config.n_ctx)).astype(np.uint16)
    return ImageSet(nano_config.n_px, None, ids, np.arange(7) % 3, None, None, "synthetic")


def _slow_features(model: GPT, ids: torch.Tensor, causal: bool = True, keep=None) -> dict[int, torch.Tensor]:
    """Layer features one image at a time from hidden_states, written out as the paper defines them."""
    out = {l: [] for l in range(model.config.n_layer + 1)}
    for i in range(len(ids)):
        states = model.hidden_states(ids[i:i + 1], causal=causal, keep=None if keep is None else keep[i:i + 1])
        for l in range(model.config.n_layer):
            out[l].append(model.blocks[l].ln_1(states[l]).mean(1)[0])
        out[model.config.n_layer].append(states[-1].mean(1)[0])  # already ln_f
    return {l: torch.stack(v) for l, v in out.items()}


def test_extraction_matches_a_direct_slow_computation(nano_model, nano_images):
    palette = Palette(np.zeros((nano_model.config.n_vocab, 3)) + np.linspace(-1, 1, nano_model.config.n_vocab)[:, None])
    ids = torch.from_numpy(nano_images.ids.astype(np.int64))
    with torch.no_grad():
        slow = _slow_features(nano_model, ids)
        fast = extract(nano_model, nano_images, palette, FeatureConfig(batch_size=3, device="cpu"), progress=False)
        assert set(fast) == set(range(nano_model.config.n_layer + 1))
        for l in slow:
            np.testing.assert_allclose(fast[l], slow[l].numpy(), rtol=1e-5, atol=1e-5)
        # mirror-image averaging: the mean with the features of each row reversed
        n = nano_model.config.n_px
        mirrored = _slow_features(nano_model, ids.view(-1, n, n).flip(2).reshape(len(ids), -1))
        flip = extract(nano_model, nano_images, palette, FeatureConfig(device="cpu", flip_average=True), progress=False)
        np.testing.assert_allclose(flip[1], ((slow[1] + mirrored[1]) / 2).numpy(), rtol=1e-5, atol=1e-5)
        # BERT: masks drawn per batch from (seed, mask index, batch start), features averaged over masks
        cfg = FeatureConfig(batch_size=4, device="cpu", n_masks=2, mask_prob=0.3, mask_seed=5)
        bert_model = copy.deepcopy(nano_model)
        bert_model.causal = False  # read as a BERT checkpoint is
        bert = extract(bert_model, nano_images, palette, cfg, progress=False)
        parts = []
        for k in range(2):
            keep = torch.cat([sample_keep_mask((len(ids[s:s + 4]), ids.shape[1]), 0.3, derived_generator(5, k, s))
                              for s in (0, 4)])
            parts.append(_slow_features(nano_model, ids, causal=False, keep=keep)[2])
        np.testing.assert_allclose(bert[2], ((parts[0] + parts[1]) / 2).numpy(), rtol=1e-5, atol=1e-5)
        unmasked = extract(bert_model, nano_images, palette, FeatureConfig(device="cpu", bert_mask=False),
                           progress=False)
        np.testing.assert_allclose(unmasked[2], _slow_features(nano_model, ids, causal=False)[2].numpy(), atol=1e-5)


def test_feature_cache_is_reused_and_keyed_by_content(tmp_path, nano_model, nano_images, monkeypatch):
    palette = Palette(np.linspace(-1, 1, 3 * nano_model.config.n_vocab).reshape(-1, 3))
    kw = {"split": "test", "model_identity": {"name": "nano"}, "cache_dir": tmp_path, "progress": False}
    first = cached_extract(nano_model, nano_images, palette, FeatureConfig(device="cpu"), **kw)
    assert len(list(tmp_path.glob("feats-test-*/progress.json"))) == 1
    monkeypatch.setattr("igpt.eval.features._batches", lambda *a, **k: pytest.fail("features were recomputed"))
    again = cached_extract(nano_model, nano_images, palette, FeatureConfig(device="cpu"), **kw)
    assert all(np.array_equal(first[l], again[l]) for l in first)
    monkeypatch.undo()
    changed = ImageSet(nano_images.n_px, None, nano_images.ids.copy(), nano_images.labels, None, None, "x")
    changed.ids[0, 0] = (changed.ids[0, 0] + 1) % nano_model.config.n_vocab
    cached_extract(nano_model, changed, palette, FeatureConfig(device="cpu"), **kw)
    cached_extract(nano_model, nano_images, palette, FeatureConfig(device="cpu", flip_average=True), **kw)
    assert len(list(tmp_path.glob("feats-test-*/progress.json"))) == 3


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.slow  # two probes over every layer
def test_pretrained_model_beats_its_random_init_on_digits(digits_run, tmp_path):
    cfg = ProbeConfig(l2_grid="1e-4,1e-3,1e-2,1e-1", max_iter=200)
    trained = probe_checkpoint(digits_run / "run", str(digits_run / "cache"), tmp_path / "trained", cfg, progress=False)
    model, palette, _ = load_checkpoint(digits_run / "run")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init", GPT(model.config), palette,
                    CheckpointRecord(model.config, palette.fingerprint(), "ar", step=0))
    init = probe_checkpoint(tmp_path / "init", str(digits_run / "cache"), tmp_path / "init-probe", cfg, progress=False)
    assert trained["best_test_acc"] > init["best_test_acc"] + 0.05, (trained["best_test_acc"], init["best_test_acc"])
    assert (tmp_path / "trained" / "probe.png").exists()


@pytest.mark.slow  # three probes and a fine-tune
def test_probe_and_finetune_read_a_hugging_face_folder_holding_only_pytorch_model_bin(digits_run, tmp_path):
    from safetensors.torch import load_file

    from igpt.config import FinetuneConfig
    from igpt.train.finetune import finetune
    from igpt.weights.convert import export_hf

    hf = export_hf(digits_run / "run", tmp_path / "hf")
    torch.save(load_file(str(hf / "model.safetensors")), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    cfg = ProbeConfig(l2=1e-2, max_iter=50)
    via_hf = probe_checkpoint(hf, str(digits_run / "cache"), tmp_path / "p-hf", cfg, FeatureConfig(device="cpu"),
                              progress=False)
    ours = probe_checkpoint(digits_run / "run", str(digits_run / "cache"), tmp_path / "p", cfg,
                            FeatureConfig(device="cpu"), progress=False)
    assert via_hf["checkpoint"] == str(hf) and via_hf["objective"] == "ar"
    for layer, r in ours["probes"]["linear"]["layers"].items():  # the same weights give the same probe
        assert via_hf["probes"]["linear"]["layers"][layer]["test_acc"] == pytest.approx(r["test_acc"], abs=1e-3)
    assert main(["probe", "--checkpoint", str(hf), "--data", str(digits_run / "cache"), "--out", str(tmp_path / "c"),
                 "--l2", "1e-2", "--max-iter", "20", "--device", "cpu"]) == 0
    tuned = finetune(hf, str(digits_run / "cache"), tmp_path / "ft",
                     FinetuneConfig(max_steps=2, eval_every=2, batch_size=8, labels_per_class=2, device="cpu"),
                     progress=False)
    assert tuned["base_checkpoint"] == str(hf)


@pytest.mark.slow  # probes with repeats
def test_cli_probe_writes_metrics_table_and_low_data(digits_run, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["probe", "--checkpoint", str(digits_run / "run"), "--data", str(digits_run / "cache"), "--out", str(out),
            "--l2-grid", "1e-3,1e-1", "--max-iter", "100", "--device", "cpu", "--concat", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "<- chosen on validation" in text and "concatenated" in text
    m = json.loads((out / "metrics.json").read_text())
    linear = m["probes"]["linear"]
    assert set(linear["layers"]) == {"0", "1", "2"} and linear["concat"]["layers"] and 0 < m["best_test_acc"] <= 1
    assert {"test_acc", "val_acc", "l2"} <= set(linear["layers"]["0"]) and m["checkpoint"].endswith("step-0000100")
    assert main(args[:-2] + ["--labels-per-class", "3", "--repeats", "2", "--out", str(tmp_path / "low")]) == 0
    low = json.loads((tmp_path / "low" / "metrics.json").read_text())
    assert len(low["probes"]["linear"]["layers"]["1"]["runs"]) == 2 and "+-" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(digits_run, tmp_path, capsys):
    ckpt = str(digits_run / "run")
    _, palette, _ = load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="no labels"):
        images = tmp_path / "flat"
        images.mkdir()
        from PIL import Image
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
        open_labelled(str(images), "train_all", n_px=8, tokenizer=palette)
    other = Palette(np.linspace(-1, 1, 48).reshape(16, 3))
    with pytest.raises(ValueError, match="palette"):
        open_labelled(str(digits_run / "cache"), "test", n_px=8, tokenizer=other)
    with pytest.raises(ValueError, match="prepared at 8x8, but 4x4"):
        open_labelled(str(digits_run / "cache"), "test", n_px=4, tokenizer=palette)
    with pytest.raises(ValueError, match="test_lossless"):
        lossless_mask("digits", 359)
    code = main(["probe", "--checkpoint", ckpt, "--data", str(digits_run / "cache"), "--out", str(tmp_path / "o"),
                 "--eval-subset", "lossless", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "test_lossless" in err


def test_lossless_subset_is_read_from_the_shared_npz():
    from conftest import shared_file

    path = shared_file("cifar10-small.npz")
    mask = lossless_mask(str(path), 2000)
    assert mask.sum() == 1000 and mask.dtype == bool


def _script(name: str) -> ModuleType:
    """scripts/NAME.py loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _tiny_cifar(path: Path, n_train: int, side: int) -> Path:
    """A CIFAR-shaped npz at ``path``: three classes of flat colours plus noise, 30 test images of which the
    first 10 are marked lossless."""
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(n_train) % 3, np.arange(30) % 3
    x_train = (rng.integers(0, 60, (n_train, side, side, 3)) + 90 * y_train[:, None, None, None]).astype(np.uint8)
    x_test = (rng.integers(0, 60, (30, side, side, 3)) + 90 * y_test[:, None, None, None]).astype(np.uint8)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, test_lossless=np.arange(30) < 10)
    return path


def test_quality_protocol_script_packs_and_runs(tmp_path, capsys):
    """scripts/cifar_quality.py end to end at toy scale: pack (palette fit, ids cache, lzma tar), then run
    (pretrain for a fixed number of steps, probe every layer of the model and of its random init)."""
    script = _script("cifar_quality")
    npz = _tiny_cifar(tmp_path / "tiny.npz", 120, 8)
    packed = tmp_path / "packs" / "tiny.tar.xz"  # a folder not made yet: pack makes it
    assert script.main(["pack", "--data", str(npz), "--out", str(packed), "--n-px", "8", "--vocab-size", "8",
                        "--device", "cpu"]) == 0
    out = tmp_path / "run"
    args = ["run", "--ids", str(packed), "--out", str(out), "--preset", "igpt-nano", "--steps", "3",
            "--batch-size", "16", "--compile", "off", "--concat", "2", "--max-iter", "30", "--device", "cpu"]
    assert script.main(args) == 0
    text = capsys.readouterr().out
    assert "on the 10 exact test images" in text and "random init" in text and "<- chosen on validation" in text
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and set(results["trained"]) >= {"best_layer", "lossless", "all", "concat"}
    assert (out / "probe.png").exists() and (out / "cifar-ids" / "test_lossless.npy").exists()
    assert script.main(["run", "--ids", str(npz), "--out", str(tmp_path / "bad"), "--steps", "1"]) == 2


@pytest.mark.slow  # times every probe
def test_probe_costs_script_times_each_probe_on_a_random_model(tmp_path, capsys):
    """scripts/probe_costs.py at toy scale: four `igpt probe` commands on a random model, a row each."""
    from igpt.bench.quality import pack

    script = _script("probe_costs")
    npz = _tiny_cifar(tmp_path / "tiny.npz", 90, 4)
    packed = pack(str(npz), tmp_path / "tiny.tar.xz", n_px=4, k=8, device="cpu")
    out = tmp_path / "costs"
    assert script.main(["--ids", str(packed), "--out", str(out), "--device", "cpu", "--preset", "igpt-nano",
                        "--batch-size", "32", "--probe-args", "--l2-grid 1e-2,1e-1 --sgd-lr-grid 1"]) == 0
    costs = json.loads((out / "costs.json").read_text())
    assert costs["n_px"] == 4 and len(costs["rows"]) == 4 and all(r["rc"] == 0 for r in costs["rows"])
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0.05 for r in costs["rows"])
    assert "--solver sgd" in costs["rows"][2]["command"] and "--attentive" in costs["rows"][3]["command"]
    assert all("--sgd-lr-grid 1" in r["command"] for r in costs["rows"])
    assert "| extraction + L-BFGS (L2 search), all layers |" in capsys.readouterr().out
    metrics = json.loads((out / "probe" / "metrics.json").read_text())
    assert set(metrics["probes"]) >= {"linear", "attentive"}
    with pytest.raises(SystemExit):  # argparse's one-line error naming the flag
        script.main(["--ids", str(tmp_path / "missing.tar.xz"), "--out", str(out)])
    assert "--ids" in capsys.readouterr().err


def test_probe_plot_takes_named_curves_and_marks_the_chosen_layer():
    from igpt.eval.plots import layer_accuracy_plot, probe_curves

    result = {"layers": {"0": {"test_acc": 0.3, "accs": {"all": 0.3}}, "1": {"test_acc": 0.6, "accs": {"all": 0.6}}},
              "best_layer": 1, "concat": {"layers": [0, 1], "test_acc": 0.65, "accs": {"all": 0.65}}}
    curves = probe_curves({"probes": {"linear": result}})
    assert curves["linear"] == {"accs": {0: 0.3, 1: 0.6}, "best_layer": 1, "concat": ([0, 1], 0.65)}
    # a further probe kind is one more entry; a plain {layer: acc} mapping is a curve too
    img = layer_accuracy_plot({**curves, "attentive probe": {0: 0.4, 1: 0.7}}, "t", chance=0.1)
    assert img.size == (800, 500) and len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 10
