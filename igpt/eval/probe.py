"""Linear probes on every layer (paper section 2.3): mean-pooled normalised features, one linear classifier
per layer.

- ``logistic_probe``: the paper's probe. Multinomial logistic regression on standardised features. The L2
  strength is chosen from a grid on a seeded, class-stratified validation carve of train (warm-starting
  each fit from the next stronger one), then the model is refitted on all of train and scored on the
  test split. Two solvers minimise the same objective: full-batch L-BFGS in torch (the paper's CIFAR
  probe) and minibatch SGD streamed from the feature files (``igpt.eval.sgd_probe``, the paper's
  ImageNet probe); ``--solver auto`` picks by the size of the fitting matrix.
- ``probe_layers``: that probe on every layer, one layer's features in memory at a time, the layer chosen
  on validation marked, and optionally the concatenation of the k layers around it (the paper's ImageNet
  trick).
- ``low_data_probe``: the semi-supervised setting, N labels per class, mean +- std over seeded repeats.
- A BERT model's test predictions under K masks can be combined by a modal vote (``test_views``).

The loss minimised is ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias unpenalised), so ``l2 = 1 / (C N)``
in scikit-learn's terms. What ``igpt probe`` runs end to end is ``igpt.eval.probe_run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt.config import ProbeConfig
from igpt.config.evaluation import AUTO_SGD_VALUES
from igpt.data.splits import balanced_subset, stratified_carve
from igpt.eval.sgd_probe import Preconditioner, Rows, Scaler, choose_lr, predict, sgd_fit
from igpt.objectives import modal_vote

PATIENCE = 3  # grid points in a row that do not beat the best validation score end the L2 search


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, *,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 500,
                 tolerance: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (D, C), b (C,)) minimising mean cross-entropy + l2 / 2 ||W||^2 by full-batch L-BFGS with a
    strong-Wolfe line search, from zeros or from ``init`` (a warm start). It stops after ``max_iter``
    iterations, or once the loss changes by less than ``tolerance`` (accuracy does not move long before)."""
    w = torch.zeros(x.shape[1], n_classes, device=x.device, dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(n_classes, device=x.device, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=tolerance, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _standardise(fit_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature with the statistics of ``fit_x`` (constant features stay 0)."""
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (fit_x, *others)]


def _scores(wb: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the classifier ``wb`` on (x, y), from one product."""
    logits = x @ wb[0] + wb[1]
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def choose_solver(cfg: ProbeConfig, n: int, d: int) -> str:
    """``cfg.solver``, with 'auto' resolved by the size of the fitting matrix (N rows x D features)."""
    if cfg.solver != "auto":
        return cfg.solver
    return "sgd" if n * d > AUTO_SGD_VALUES else "lbfgs"


def check_labels(train_y: np.ndarray, test_y: np.ndarray) -> int:
    """The number of classes, after checking that labels are integers in 0..C-1 and that every test class
    also occurs in train (a probe cannot predict a class it never saw)."""
    for name, y in (("train", train_y), ("test", test_y)):
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"probe: {name} labels must be a 1-D array of integers, got {y.dtype} {y.shape}")
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"probe: {name} label {int(y.min())} is out of range (labels are 0..C-1)")
    unseen = np.setdiff1d(np.unique(test_y), np.unique(train_y))
    if len(unseen):
        raise ValueError(f"probe: test label {int(unseen[0])} never occurs in the training labels")
    return int(max(np.max(train_y), np.max(test_y))) + 1


def _walk(grid: list[float], fit: Callable[[float, Any], tuple[float, float, Any]], progress: bool, desc: str
          ) -> tuple[float, float, float, Any]:
    """(l2, validation accuracy, validation log-loss, solution) of the best strength of ``grid``, walked
    strongest first, each fit warm-started from the last one's solution. The best has the highest
    validation accuracy, and among equal accuracies the lowest log-loss: on a carve of a hundred images
    many strengths tie on accuracy, and "the strongest of the tied" would then turn on single flipped
    predictions, which two solvers at the same minimum do not share; the log-loss moves smoothly with the
    fit. The walk stops once ``PATIENCE`` strengths in a row score below the best so far without beating
    it (validation accuracy is unimodal in the strength, and the weak end is where the solvers are
    slowest)."""
    solution, scores, solutions = None, {}, {}
    for l2 in tqdm(grid, desc=desc, unit="L2", leave=False, disable=not progress):
        acc, loss, solution = fit(l2, solution)
        scores[l2], solutions[l2] = (acc, -loss), solution
        best = max(scores, key=lambda s: (scores[s], s))  # exact ties: the stronger penalty
        if len(scores) > PATIENCE and best not in list(scores)[-PATIENCE:]:
            break
    return best, scores[best][0], -scores[best][1], solutions[best]


def _carve(y: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(fit rows, validation rows, L2 grid strongest first); without validation rows the grid must be one
    value."""
    fit_i, val_i = stratified_carve(y, cfg.val_fraction, cfg.seed)
    grid = sorted(set(cfg.grid), reverse=True)
    if len(val_i) == 0 and len(grid) > 1:
        raise ValueError("no validation images to choose the L2 strength on (one labelled image per class, "
                         "or --val-fraction 0): pass a fixed --l2")
    return fit_i, val_i, grid


def _lbfgs(train: Rows, y: torch.Tensor, tests: list[Rows], n_classes: int, cfg: ProbeConfig, progress: bool
           ) -> dict[str, Any]:
    """The full-batch probe: {"l2", "val_acc", "val_loss", "preds": (K, N_test) for the K test views}."""
    x = train.everything()
    fit_i, val_i, grid = _carve(y.cpu().numpy(), cfg)
    l2, val_acc, val_loss, init = grid[0], None, None, None
    if len(val_i):
        fi, vi = (torch.from_numpy(i).to(x.device) for i in (fit_i, val_i))
        xf, xv = _standardise(x[fi], x[vi])

        def fit(strength: float, start: Any) -> tuple[float, float, Any]:
            wb = fit_logistic(xf, y[fi], n_classes, strength, init=start, max_iter=cfg.max_iter)
            return *_scores(wb, xv, y[vi]), wb

        l2, val_acc, val_loss, init = _walk(grid, fit, progress, "L2 search (L-BFGS)")
        del xf, xv
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    del x
    wb = fit_logistic(xs, y, n_classes, l2, init=init, max_iter=cfg.max_iter)
    del xs
    preds = [predict(t, np.arange(t.n), Scaler(mean, std), wb) for t in tests]
    return {"l2": l2, "val_acc": val_acc, "val_loss": val_loss, "preds": torch.stack(preds)}


def _sgd(train: Rows, y: torch.Tensor, tests: list[Rows], n_classes: int, cfg: ProbeConfig, progress: bool
         ) -> dict[str, Any]:
    """The minibatch probe (``igpt.eval.sgd_probe``) on the same carve and grid: {"l2", "lr", "val_acc",
    "val_loss", "preds"}."""
    fit_i, val_i, grid = _carve(y.cpu().numpy(), cfg)
    kw = {"epochs": cfg.sgd_epochs, "batch_size": cfg.sgd_batch_size, "seed": cfg.seed}
    rates: dict[float, float] = {}
    l2, val_acc, val_loss, init = grid[0], None, None, None
    if len(val_i):
        scaler = Scaler(*train.stats(fit_i))
        precond = Preconditioner(train, fit_i, scaler)

        def fit(strength: float, start: Any) -> tuple[float, float, Any]:
            lr, acc, loss, wb = choose_lr(train, fit_i, val_i, y, scaler, n_classes, strength, cfg.lr_grid,
                                          precond=precond, init=start, **kw)
            rates[strength] = lr
            return acc, loss, wb

        l2, val_acc, val_loss, init = _walk(grid, fit, progress, "L2 search (SGD)")
    all_i = np.arange(train.n)
    scaler = Scaler(*train.stats(all_i))
    precond = Preconditioner(train, all_i, scaler)
    if l2 in rates:
        lr = rates[l2]
        wb = sgd_fit(train, all_i, y, scaler, n_classes, l2, lr, precond=precond, init=init, **kw)
    else:  # no validation rows: the rate is chosen on the training objective
        lr, _, _, wb = choose_lr(train, all_i, None, y, scaler, n_classes, l2, cfg.lr_grid, precond=precond,
                                 init=None, **kw)
    if wb is None:
        raise ValueError(f"the SGD probe diverged refitting at --l2 {l2} with learning rate {lr}")
    preds = [predict(t, np.arange(t.n), scaler, wb) for t in tests]
    return {"l2": l2, "lr": lr, "val_acc": val_acc, "val_loss": val_loss, "preds": torch.stack(preds)}


def _as_columns(x: Any) -> list[Any]:
    """One feature block (an array or tensor (N, D)) or a list of blocks to concatenate."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _columns(x: Any) -> list[Any]:
    return [c.cpu().numpy() if isinstance(c, torch.Tensor) else c for c in _as_columns(x)]


def logistic_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, cfg: ProbeConfig = ProbeConfig(), *,
                   subsets: dict[str, np.ndarray | None] | None = None, device: str | torch.device = "cpu",
                   n_classes: int | None = None, test_views: list[Any] | None = None, progress: bool = False
                   ) -> dict[str, Any]:
    """Fit on (train_x (N, D), train_y (N,)), score on test. ``train_x`` and ``test_x`` may each be a list of
    blocks (layers) concatenated along features; ``test_views`` replaces ``test_x`` by K views of the test
    set (BERT masks) whose predictions are combined by a modal vote (ties broken at random, seeded by
    ``cfg.seed``). ``subsets`` maps names to boolean masks or indices of the test set (None = all of it);
    the first is "test_acc". Returns {"test_acc", "accs": {name: acc}, "l2", "val_acc", "val_loss" (the
    validation carve's mean cross-entropy), "solver"} (and "lr" for SGD)."""
    dev = torch.device(device)
    y_np, yt_np = np.asarray(train_y), np.asarray(test_y)
    n_classes = n_classes or check_labels(y_np, yt_np)
    views = test_views if test_views is not None else [test_x]
    train = Rows(_columns(train_x), dev)
    tests = [Rows(_columns(v), dev) for v in views]
    if train.n != len(y_np) or any(t.n != len(yt_np) or t.d != train.d for t in tests):
        raise ValueError(f"logistic_probe: features ({train.n}, {train.d}) / {[(t.n, t.d) for t in tests]} and "
                         f"labels {y_np.shape} / {yt_np.shape} do not match")
    y = torch.from_numpy(y_np.astype(np.int64)).to(dev)
    solver = choose_solver(cfg, train.n, train.d)
    fitted = (_sgd if solver == "sgd" else _lbfgs)(train, y, tests, n_classes, cfg, progress)
    preds = fitted.pop("preds").cpu().numpy()  # (K, N_test)
    final = preds[0] if len(preds) == 1 else modal_vote(preds, n_classes, cfg.seed)
    correct = (final == yt_np).astype(np.float64)
    accs = {}
    for name, idx in (subsets or {"all": None}).items():
        picked = correct if idx is None else correct[idx]
        accs[name] = float(picked.mean()) if picked.size else float("nan")
    return {"test_acc": next(iter(accs.values())), "accs": accs, "solver": solver, **fitted}


# ---------------------------------------------------------------------------------------------- every layer


def _pick_best(results: Mapping[int, dict[str, Any]]) -> int:
    """The layer with the highest validation accuracy, among equal accuracies the lowest validation
    log-loss (as for the L2 strength), then the earliest. Without validation images (a fixed --l2 on one
    image per class) there is no honest choice, and the last layer is taken."""
    if any(r.get("val_acc") is None for r in results.values()):
        return max(results)
    return max(sorted(results), key=lambda layer: (results[layer]["val_acc"], -results[layer].get("val_loss", 0.0)))


def concat_layers(best: int, layers: Sequence[int] | int, k: int) -> list[int]:
    """The ``k`` consecutive layers of ``layers`` (or of 0..layers-1) centred on ``best``: for even k the
    extra layer is taken after it; at either end the window shifts inwards rather than shrinking, so it
    always holds min(k, len(layers)) layers."""
    pool = list(range(layers)) if isinstance(layers, int) else sorted(layers)
    k = min(k, len(pool))
    at = pool.index(best)
    lo = max(0, min(at - (k - 1) // 2, len(pool) - k))
    return pool[lo:lo + k]


def _views(test_feats: Mapping[int, Any] | list[Mapping[int, Any]]) -> list[Mapping[int, Any]]:
    return test_feats if isinstance(test_feats, list) else [test_feats]


def _probe_one(train_feats: Mapping[int, Any], train_y: np.ndarray, views: list[Mapping[int, Any]],
               test_y: np.ndarray, group: list[int], cfg: ProbeConfig, index: np.ndarray | None = None,
               **kw: Any) -> dict[str, Any]:
    """``logistic_probe`` on the layers ``group`` (one, or several concatenated), rows ``index`` of train;
    each layer's memory map is opened here and released when the fit returns."""
    train = [train_feats[layer] if index is None else train_feats[layer][index] for layer in group]
    tests = [[v[layer] for layer in group] for v in views]
    y = np.asarray(train_y) if index is None else np.asarray(train_y)[index]
    return logistic_probe(train, y, None, test_y, cfg, test_views=tests, **kw)


def _summary(layers: dict[int, dict[str, Any]], best: int) -> dict[str, Any]:
    return {"layers": layers, "best_layer": best, "best_val_acc": layers[best]["val_acc"],
            "best_test_acc": layers[best]["test_acc"], "concat": None}


def probe_layers(train_feats: Mapping[int, Any], train_y: np.ndarray,
                 test_feats: Mapping[int, Any] | list[Mapping[int, Any]], test_y: np.ndarray,
                 cfg: ProbeConfig = ProbeConfig(), *, subsets: dict[str, np.ndarray | None] | None = None,
                 device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """``logistic_probe`` on every layer, one layer in memory at a time: {"layers": {l: result},
    "best_layer" (chosen by validation accuracy), "best_val_acc", "best_test_acc" (its test accuracy),
    "concat": result with its "layers", or None}. ``test_feats`` may be a list of K views (a vote)."""
    views = _views(test_feats)
    kw = {"subsets": subsets, "device": device, "n_classes": check_labels(np.asarray(train_y), np.asarray(test_y)),
          "progress": progress}
    layers = {layer: _probe_one(train_feats, train_y, views, test_y, [layer], cfg, **kw)
              for layer in tqdm(sorted(train_feats), desc="probe", unit="layer", disable=not progress)}
    out = _summary(layers, _pick_best(layers))
    if cfg.concat > 1:
        group = concat_layers(out["best_layer"], sorted(layers), cfg.concat)
        out["concat"] = {"layers": group, **_probe_one(train_feats, train_y, views, test_y, group, cfg, **kw)}
    return out


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over repeats of logistic_probe results."""
    accs = np.array([r["test_acc"] for r in runs])
    val, loss = [r["val_acc"] for r in runs], [r["val_loss"] for r in runs]
    return {"test_acc": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(runs) > 1 else 0.0,
            "accs": {name: float(np.mean([r["accs"][name] for r in runs])) for name in runs[0]["accs"]},
            "runs": accs.tolist(), "l2": [r["l2"] for r in runs], "solver": runs[0]["solver"],
            "val_acc": None if None in val else float(np.mean(val)),
            "val_loss": None if None in loss else float(np.mean(loss))}


def low_data_subsets(train_y: np.ndarray, cfg: ProbeConfig) -> list[np.ndarray]:
    """The ``cfg.repeats`` balanced subsets of ``cfg.labels_per_class`` images per class (seeded by [seed,
    repeat]); a class with fewer images is a one-line error naming it (callers check before extracting)."""
    return [balanced_subset(train_y, cfg.labels_per_class, [cfg.seed, r]) for r in range(cfg.repeats)]


def low_data_probe(train_feats: Mapping[int, Any], train_y: np.ndarray,
                   test_feats: Mapping[int, Any] | list[Mapping[int, Any]], test_y: np.ndarray, cfg: ProbeConfig, *,
                   subsets: dict[str, np.ndarray | None] | None = None, device: str | torch.device = "cpu",
                   progress: bool = False) -> dict[str, Any]:
    """The semi-supervised setting: ``cfg.labels_per_class`` images per class for each of ``cfg.repeats``
    subsets; every layer's accuracy is the mean +- std over them, the best layer is chosen by mean
    validation accuracy, and the concatenation (if asked) is centred on it."""
    views = _views(test_feats)
    kw = {"subsets": subsets, "device": device, "n_classes": check_labels(np.asarray(train_y), np.asarray(test_y))}
    picks = low_data_subsets(train_y, cfg)
    layers = {}
    for layer in tqdm(sorted(train_feats), desc="probe", unit="layer", disable=not progress):
        layers[layer] = _aggregate([_probe_one(train_feats, train_y, views, test_y, [layer], cfg, idx, **kw)
                                    for idx in picks])
    out = {**_summary(layers, _pick_best(layers)), "labels_per_class": cfg.labels_per_class,
           "repeats": cfg.repeats, "subsets": [idx.tolist() for idx in picks]}
    if cfg.concat > 1:
        group = concat_layers(out["best_layer"], sorted(layers), cfg.concat)
        out["concat"] = {"layers": group, **_aggregate([
            _probe_one(train_feats, train_y, views, test_y, group, cfg, idx, **kw) for idx in picks])}
    return out


def probe_features(train_feats: Mapping[int, Any], train_y: np.ndarray,
                   test_feats: Mapping[int, Any] | list[Mapping[int, Any]], test_y: np.ndarray, cfg: ProbeConfig,
                   **kw: Any) -> dict[str, Any]:
    """``low_data_probe`` when ``cfg.labels_per_class`` is set, else ``probe_layers``."""
    run = low_data_probe if cfg.labels_per_class else probe_layers
    return run(train_feats, train_y, test_feats, test_y, cfg, **kw)


def format_table(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """The per-layer table of one probe's result (``probe_layers``): test accuracy per subset (mean +- std in
    the low-data setting), chosen L2, validation accuracy, the layer chosen on validation marked;
    ``baseline`` (the same probe of another model, e.g. the same architecture at random initialisation)
    adds a column."""
    layers = result["layers"]
    names = list(next(iter(layers.values()))["accs"])
    head = "layer" + "".join(f"{'test acc ' + n:>18}" for n in names) + (f"{'init acc':>10}" if baseline else "")
    lines = [head + f"{'L2':>10}{'val acc':>10}"]

    def row(label: str, r: dict[str, Any], base: dict[str, Any] | None) -> str:
        std = f" +-{r['std']:.3f}" if "std" in r else ""
        texts = [f"{r['accs'][n]:.4f}" + (std if i == 0 else "") for i, n in enumerate(names)]
        cells = "".join(f"{t:>18}" for t in texts)
        l2 = r["l2"] if isinstance(r["l2"], float) else float(np.median(r["l2"]))
        val = "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        init = f"{base['test_acc']:>10.4f}" if base else (" " * 10 if baseline else "")
        return f"{label:>5}{cells}{init}{l2:>10.0e}{val:>10}"

    for layer, r in layers.items():
        base = baseline["layers"].get(layer) if baseline else None
        mark = "  <- chosen on validation" if layer == result["best_layer"] else ""
        lines.append(row(str(layer), r, base) + mark)
    if result.get("concat"):
        c = result["concat"]
        base = baseline.get("concat") if baseline else None
        lines.append(row("cat", c, base) + f"  layers {c['layers'][0]}..{c['layers'][-1]} concatenated")
    return "\n".join(lines)
