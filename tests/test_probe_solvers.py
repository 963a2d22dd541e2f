"""The two probe solvers (full-batch L-BFGS, streamed minibatch SGD) minimise one objective and agree; the
automatic choice; the modal vote over BERT masks; concatenation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igpt.config import ProbeConfig
from igpt.config.evaluation import AUTO_SGD_VALUES
from igpt.eval import sgd_probe
from igpt.eval.probe import _standardise, choose_solver, concat_layers, fit_logistic, logistic_probe
from igpt.eval.sgd_probe import Preconditioner, Rows, Scaler, choose_lr, full_objective, sgd_fit
from igpt.objectives import modal_vote


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's bundled handwritten digits (real data, 64 pixel features), split 1200 / 597."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order].astype(np.float32), y[order]


@pytest.mark.slow  # SGD to convergence
def test_sgd_minimises_the_same_objective_as_lbfgs(digits):
    x, y = (torch.from_numpy(a) for a in digits)
    rows = Rows([digits[0]], torch.device("cpu"))
    index = np.arange(len(x))
    scaler = Scaler(*rows.stats(index))
    precond = Preconditioner(rows, index, scaler)
    (xs,) = _standardise(x)
    np.testing.assert_allclose(scaler.mean.numpy(), x.mean(0).numpy(), rtol=1e-5, atol=1e-4)
    grid = ProbeConfig().lr_grid
    for l2 in (1e-1, 1e-2, 1e-3):
        w, b = fit_logistic(xs, y, 10, l2, max_iter=2000, tolerance=1e-12)
        exact = (F.cross_entropy(xs @ w + b, y) + 0.5 * l2 * (w * w).sum()).item()
        # the default rates, the one reaching the lowest objective kept (no validation rows)
        _, _, _, wb = choose_lr(rows, index, None, y, scaler, 10, l2, grid, precond=precond, init=None, epochs=40,
                                batch_size=256, seed=0)
        found = full_objective(rows, index, y, scaler, wb, l2)
        assert exact <= found < exact * 1.03, (l2, exact, found)  # the same minimum, approached from above
        # and the same classifier, in the same (standardised) coordinates
        agree = ((xs @ wb[0] + wb[1]).argmax(1) == (xs @ w + b).argmax(1)).float().mean()
        assert agree > 0.98


@pytest.mark.slow  # SGD to convergence
def test_preconditioning_is_what_lets_sgd_reach_the_minimum_on_correlated_features(digits):
    # every feature a mix of a few strong directions and many weak ones, as a trained model's pooled
    # features are: standardising leaves the correlations, and plain SGD crawls along the weak directions
    x, y = digits
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)) * np.logspace(0, -3, 64)[:, None]  # singular values over 3 decades
    mixed = (x @ mixing).astype(np.float32)
    rows, yt, index = Rows([mixed], torch.device("cpu")), torch.from_numpy(y), np.arange(len(x))
    scaler = Scaler(*rows.stats(index))
    (xs,) = _standardise(torch.from_numpy(mixed))
    l2 = 1e-4
    w, b = fit_logistic(xs, yt, 10, l2, max_iter=5000, tolerance=1e-12)
    exact = (F.cross_entropy(xs @ w + b, yt) + 0.5 * l2 * (w * w).sum()).item()
    kw = {"epochs": 40, "batch_size": 256, "seed": 0}
    plain = min(full_objective(rows, index, yt, scaler, wb, l2) for lr in (30.0, 10.0, 3.0, 1.0)
                if (wb := sgd_fit(rows, index, yt, scaler, 10, l2, lr, precond=None, **kw)) is not None)
    wb = sgd_fit(rows, index, yt, scaler, 10, l2, 1.0, precond=Preconditioner(rows, index, scaler), **kw)
    found = full_objective(rows, index, yt, scaler, wb, l2)
    assert exact <= found < exact * 1.05, (exact, found)
    assert plain > exact * 1.5, (exact, plain)  # the best plain rate is nowhere near
    # no penalty on 40 rows of 64 features: S is singular, and the fit still stays finite
    few = np.arange(40)
    scaler = Scaler(*rows.stats(few))
    wb = sgd_fit(rows, few, yt, scaler, 10, 0.0, 1.0, precond=Preconditioner(rows, few, scaler), **kw)
    assert wb is not None and all(torch.isfinite(t).all() for t in wb)


@pytest.mark.slow  # SGD to convergence
def test_sgd_and_lbfgs_probes_agree_within_one_point_on_digits(digits):
    x, y = digits
    cfg = ProbeConfig(l2_grid="1e-3,1e-2,1e-1", sgd_lr_grid="3,1,0.3")
    lbfgs = logistic_probe(x[:1200], y[:1200], x[1200:], y[1200:], ProbeConfig(**{**cfg.__dict__, "solver": "lbfgs"}))
    sgd = logistic_probe(x[:1200], y[:1200], x[1200:], y[1200:], ProbeConfig(**{**cfg.__dict__, "solver": "sgd"}))
    assert lbfgs["solver"] == "lbfgs" and sgd["solver"] == "sgd" and sgd["lr"] in (3.0, 1.0, 0.3)
    assert abs(lbfgs["test_acc"] - sgd["test_acc"]) <= 0.01, (lbfgs, sgd)
    assert lbfgs["test_acc"] > 0.9


@pytest.mark.slow  # SGD at each rate
def test_the_learning_rate_is_chosen_on_the_validation_carve_not_the_training_objective(digits):
    # 60 fitting rows and almost no penalty: the largest rate drives the training objective lowest by
    # overfitting, while a moderate one generalises; the rate is chosen by the validation rows' log-loss
    x, y = digits
    rows, yt = Rows([x], torch.device("cpu")), torch.from_numpy(y)
    fit_i, val_i = np.arange(60), np.arange(60, 400)
    scaler = Scaler(*rows.stats(fit_i))
    grid = (3.0, 0.3, 0.001)
    kw = {"precond": Preconditioner(rows, fit_i, scaler), "epochs": 1, "batch_size": 32, "seed": 0}
    train_obj, val_loss = {}, {}
    for lr in grid:
        wb = sgd_fit(rows, fit_i, yt, scaler, 10, 1e-6, lr, **kw)
        train_obj[lr] = full_objective(rows, fit_i, yt, scaler, wb, 1e-6)
        val_loss[lr] = full_objective(rows, val_i, yt, scaler, wb, 0.0)
    assert min(train_obj, key=train_obj.get) != min(val_loss, key=val_loss.get)  # the two criteria differ here
    lr, acc, loss, _ = choose_lr(rows, fit_i, val_i, yt, scaler, 10, 1e-6, grid, init=None, **kw)
    assert lr == min(val_loss, key=val_loss.get) and 0.5 < acc <= 1.0 and loss == pytest.approx(val_loss[lr])
    # without validation rows (no carve) the training objective is all there is
    lr, acc, loss, _ = choose_lr(rows, fit_i, None, yt, scaler, 10, 1e-6, grid, init=None, **kw)
    assert lr == min(train_obj, key=train_obj.get) and acc is None and loss is None


def test_streamed_minibatches_from_memory_maps_match_the_in_memory_fit(digits, tmp_path, monkeypatch):
    x, y = digits
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    index = np.arange(600)
    yt = torch.from_numpy(y)
    held = Rows([x], torch.device("cpu"))
    monkeypatch.setattr(sgd_probe, "IN_MEMORY_VALUES", 0)  # read every minibatch from the file
    streamed = Rows([mapped[:, :32], mapped[:, 32:]], torch.device("cpu"))  # two blocks, concatenated
    assert streamed._all is None and held._all is not None
    fits = []
    for rows in (held, streamed):
        scaler = Scaler(*rows.stats(index))
        precond = Preconditioner(rows, index, scaler)
        fits.append(sgd_fit(rows, index, yt, scaler, 10, 1e-2, 1.0, precond=precond, epochs=2, batch_size=64, seed=3))
    torch.testing.assert_close(fits[0][0], fits[1][0], rtol=1e-4, atol=1e-5)


def test_auto_picks_lbfgs_for_small_and_sgd_for_large_problems():
    auto = ProbeConfig()
    assert choose_solver(auto, 50_000, 512) == "lbfgs"  # iGPT-S on CIFAR-10, one layer
    assert choose_solver(auto, 50_000, 11 * 512) == "sgd"  # eleven of its layers concatenated
    assert choose_solver(auto, 1_281_167, 1536) == "sgd"  # iGPT-L on ImageNet
    assert choose_solver(auto, AUTO_SGD_VALUES, 1) == "lbfgs"
    assert choose_solver(ProbeConfig(solver="sgd"), 10, 10) == "sgd"
    with pytest.raises(ValueError, match="--sgd-lr-grid"):
        ProbeConfig(sgd_lr_grid="1,0")


def test_modal_vote_takes_the_most_frequent_class_and_breaks_ties_at_random():
    preds = np.array([[0, 1, 2, 3], [0, 1, 1, 4], [1, 1, 2, 5]])
    assert modal_vote(preds, 6, seed=0)[:3].tolist() == [0, 1, 2]
    ties = np.array([[0] * 400, [1] * 400])  # every image a tie between classes 0 and 1
    voted = modal_vote(ties, 2, seed=0)
    assert 150 < voted.sum() < 250  # both sides win about half of the ties
    assert np.array_equal(voted, modal_vote(ties, 2, seed=0)) and not np.array_equal(voted, modal_vote(ties, 2, seed=1))


def test_a_vote_over_test_views_beats_each_noisy_view(digits):
    x, y = digits
    rng = np.random.default_rng(0)
    views = [x[1200:] + rng.normal(0, 6, x[1200:].shape).astype(np.float32) for _ in range(5)]
    cfg = ProbeConfig(l2=1e-2)
    single = [logistic_probe(x[:1200], y[:1200], v, y[1200:], cfg)["test_acc"] for v in views]
    voted = logistic_probe(x[:1200], y[:1200], None, y[1200:], cfg, test_views=views)["test_acc"]
    assert voted > np.mean(single) + 0.01, (voted, single)


def test_concat_window_keeps_k_layers_shifting_at_the_ends():
    assert concat_layers(12, 25, 11) == list(range(7, 18))  # centred
    assert concat_layers(1, 25, 11) == list(range(0, 11))  # shifted right, not shrunk
    assert concat_layers(24, 25, 11) == list(range(14, 25))  # shifted left
    assert concat_layers(5, 25, 4) == [4, 5, 6, 7]  # even K: the extra layer after the best
    assert concat_layers(2, 5, 11) == [0, 1, 2, 3, 4]  # more than the model has: all of them
    assert concat_layers(6, [2, 4, 6, 8], 3) == [4, 6, 8]  # a --layers selection: its own neighbours


def test_finetune_predictions_vote_over_bert_masks(nano_model):
    from igpt.config import FinetuneConfig
    from igpt.data.imageset import ImageSet
    from igpt.tokenizers import Palette
    from igpt.train.finetune import Classifier, evaluate, predict

    nano_model.causal = False
    clf = Classifier(nano_model, 3, mask_prob=0.5)
    torch.nn.init.normal_(clf.head.weight, std=3.0, generator=torch.Generator().manual_seed(0))
    ids = np.random.default_rng(0).integers(0, 16, (50, 16)).astype(np.uint16)
    images = ImageSet(4, None, ids, np.arange(50) % 3, None, None, "synthetic")
    palette = Palette(np.linspace(-1, 1, 48).reshape(16, 3))
    args = (clf, images, palette)
    run = (torch.device("cpu"), torch.float32)
    one = FinetuneConfig(device="cpu", n_masks=1)
    each = np.stack([evaluate(*args, one, *run, mask=k)[0] for k in range(3)])
    assert not np.array_equal(each[0], each[1])  # independent masks, different predictions
    np.testing.assert_array_equal(predict(*args, one, *run), each[0])  # one mask: as before
    voted = predict(*args, FinetuneConfig(device="cpu", n_masks=3), *run)
    np.testing.assert_array_equal(voted, modal_vote(each, 3, seed=0))
