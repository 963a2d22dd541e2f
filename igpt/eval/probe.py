"""Linear probes on every layer (paper section 2.3): mean-pooled normalised features, one linear classifier
per layer.

- ``logistic_probe``: the paper's probe. Multinomial logistic regression on standardised features, fitted
  by full-batch L-BFGS in torch (on the GPU when there is one). The L2 strength is chosen from a grid on a
  seeded, class-stratified validation carve of train (warm-starting each fit from the next stronger one),
  then the model is refitted on all of train and scored on the test split.
- ``probe_layers``: that probe on every layer of cached features, the best layer (by validation accuracy)
  marked, and optionally the concatenation of the k layers around it (the paper's ImageNet trick).
- ``low_data_probe``: the semi-supervised setting, N labels per class, mean +- std over seeded repeats.
- ``igpt.eval.ridge_probe``: the cheap closed-form ridge probe the demo runs; a quick look.
- ``probe_checkpoint``: what ``igpt probe`` runs (load, extract with a cache, probe, write outputs).

The loss minimised is ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias unpenalised), so ``l2 = 1 / (C N)``
in scikit-learn's terms.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt.atomic import check_output, write_json
from igpt.config import FeatureConfig, ProbeConfig
from igpt.data.open import lossless_mask, open_labelled
from igpt.data.splits import balanced_subset, stratified_carve
from igpt.eval.features import cached_extract, checkpoint_identity, for_reading
from igpt.runtime import resolve_device
from igpt.viz import layer_plot, save_png
from igpt.weights.convert import load_located

PATIENCE = 3  # grid points in a row that do not beat the best validation accuracy end the L2 search


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


def _accuracy(wb: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x @ wb[0] + wb[1]).argmax(1) == y).float().mean().item()


def _choose_l2(x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: ProbeConfig
               ) -> tuple[float, float | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """(l2, its validation accuracy, its weights) over the grid, strongest first so that each fit starts
    from the last one's solution; the walk stops once ``PATIENCE`` strengths in a row score below the best
    so far without beating it (validation accuracy is unimodal in the strength, and the weak end is where
    L-BFGS is slowest). Ties go to the stronger penalty. Without validation images (one image per class) a single-value grid
    is used as is, with no validation accuracy."""
    fit_i, val_i = stratified_carve(y.cpu().numpy(), cfg.val_fraction, cfg.seed)
    grid = sorted(set(cfg.grid), reverse=True)
    if len(val_i) == 0:
        if len(grid) > 1:
            raise ValueError("no validation images to choose the L2 strength on (one labelled image per class, "
                             "or --val-fraction 0): pass a fixed --l2")
        return grid[0], None, None
    fit_i, val_i = torch.from_numpy(fit_i).to(x.device), torch.from_numpy(val_i).to(x.device)
    xf, xv = _standardise(x[fit_i], x[val_i])
    wb, scores, solutions = None, {}, {}
    for l2 in grid:
        wb = fit_logistic(xf, y[fit_i], n_classes, l2, init=wb, max_iter=cfg.max_iter)
        scores[l2], solutions[l2] = _accuracy(wb, xv, y[val_i]), wb
        best = max(scores, key=lambda s: (scores[s], s))
        if len(scores) > PATIENCE and best not in list(scores)[-PATIENCE:]:
            break
    return best, scores[best], solutions[best]


def _tensor(a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor or array on ``device``; arrays are copied (a memory-mapped one may be read-only)."""
    if isinstance(a, torch.Tensor):
        return a.to(device, dtype)
    return torch.from_numpy(np.array(a)).to(device, dtype)


def logistic_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, cfg: ProbeConfig = ProbeConfig(), *,
                   subsets: dict[str, np.ndarray | None] | None = None, device: str | torch.device = "cpu",
                   n_classes: int | None = None) -> dict[str, Any]:
    """Fit on (train_x (N, D), train_y (N,)), score on test. ``subsets`` maps names to boolean masks or
    indices of the test set (None = all of it); the first is "acc". Returns {"acc", "accs": {name: acc},
    "l2", "val_acc"}."""
    dev = torch.device(device)
    x, xt = (_tensor(a, torch.float32, dev) for a in (train_x, test_x))
    y, yt = (_tensor(a, torch.int64, dev) for a in (train_y, test_y))
    if len(x) != len(y) or len(xt) != len(yt) or x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"logistic_probe: features {tuple(x.shape)}/{tuple(xt.shape)} and labels "
                         f"{tuple(y.shape)}/{tuple(yt.shape)} do not match")
    if int(min(y.min(), yt.min())) < 0:
        raise ValueError("logistic_probe: labels must be >= 0")
    n_classes = n_classes or int(max(y.max(), yt.max())) + 1
    l2, val_acc, init = _choose_l2(x, y, n_classes, cfg)
    xs, xts = _standardise(x, xt)
    wb = fit_logistic(xs, y, n_classes, l2, init=init, max_iter=cfg.max_iter)
    correct = ((xts @ wb[0] + wb[1]).argmax(1) == yt).float().cpu().numpy()
    accs = {}
    for name, idx in (subsets or {"all": None}).items():
        picked = correct if idx is None else correct[idx]
        accs[name] = float(picked.mean()) if picked.size else float("nan")
    return {"acc": next(iter(accs.values())), "accs": accs, "l2": l2, "val_acc": val_acc}


# ---------------------------------------------------------------------------------------------- every layer


def _pick_best(results: dict[int, dict[str, Any]]) -> int:
    """The layer with the highest validation accuracy (the earliest on ties); by test accuracy only when
    there are no validation images."""
    key = "val_acc" if all(r.get("val_acc") is not None for r in results.values()) else "acc"
    return max(sorted(results), key=lambda layer: results[layer][key])


def concat_layers(best: int, n_layers: int, k: int) -> list[int]:
    """The ``k`` consecutive layers of 0..n_layers-1 centred on ``best`` (shifted inwards at the ends)."""
    k = min(k, n_layers)
    lo = max(0, min(best - (k - 1) // 2, n_layers - k))
    return list(range(lo, lo + k))


def _concat(feats: dict[int, np.ndarray], layers: list[int], index: np.ndarray | None = None) -> np.ndarray:
    return np.concatenate([feats[layer] if index is None else feats[layer][index] for layer in layers], axis=1)


def probe_layers(train_feats: dict[int, np.ndarray], train_y: np.ndarray, test_feats: dict[int, np.ndarray],
                 test_y: np.ndarray, cfg: ProbeConfig = ProbeConfig(), *,
                 subsets: dict[str, np.ndarray | None] | None = None, device: str | torch.device = "cpu",
                 progress: bool = False) -> dict[str, Any]:
    """``logistic_probe`` on every layer: {"layers": {l: result}, "best_layer", "best_acc" (chosen by
    validation accuracy), "oracle_layer", "oracle_acc" (the best test accuracy, what papers usually
    quote), "concat": result with its "layers", or None}."""
    n_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    kw = {"subsets": subsets, "device": device, "n_classes": n_classes}
    layers = {layer: logistic_probe(train_feats[layer], train_y, test_feats[layer], test_y, cfg, **kw)
              for layer in tqdm(sorted(train_feats), desc="probe", unit="layer", disable=not progress)}
    best = _pick_best(layers)
    oracle = max(sorted(layers), key=lambda layer: layers[layer]["acc"])
    out = {"layers": layers, "best_layer": best, "best_acc": layers[best]["acc"], "oracle_layer": oracle,
           "oracle_acc": layers[oracle]["acc"], "concat": None}
    if cfg.concat > 1:
        group = concat_layers(best, len(layers), cfg.concat)
        result = logistic_probe(_concat(train_feats, group), train_y, _concat(test_feats, group), test_y, cfg, **kw)
        out["concat"] = {"layers": group, **result}
    return out


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over repeats of logistic_probe results."""
    accs = np.array([r["acc"] for r in runs])
    val = [r["val_acc"] for r in runs]
    return {"acc": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(runs) > 1 else 0.0,
            "accs": {name: float(np.mean([r["accs"][name] for r in runs])) for name in runs[0]["accs"]},
            "runs": accs.tolist(), "l2": [r["l2"] for r in runs],
            "val_acc": None if None in val else float(np.mean(val))}


def low_data_probe(train_feats: dict[int, np.ndarray], train_y: np.ndarray, test_feats: dict[int, np.ndarray],
                   test_y: np.ndarray, cfg: ProbeConfig, *, subsets: dict[str, np.ndarray | None] | None = None,
                   device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """The semi-supervised setting: ``cfg.labels_per_class`` images per class (balanced, seeded by
    [seed, repeat]) for each of ``cfg.repeats`` subsets; every layer's accuracy is the mean +- std over
    them, the best layer is chosen by mean validation accuracy, and the concatenation (if asked) is
    centred on it."""
    n_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    kw = {"subsets": subsets, "device": device, "n_classes": n_classes}
    picks = [balanced_subset(train_y, cfg.labels_per_class, [cfg.seed, r]) for r in range(cfg.repeats)]
    single = dataclasses.replace(cfg, concat=0)
    runs = [probe_layers({layer: f[idx] for layer, f in train_feats.items()}, np.asarray(train_y)[idx],
                         test_feats, test_y, single, subsets=subsets, device=device, progress=progress)
            for idx in picks]
    layers = {layer: _aggregate([run["layers"][layer] for run in runs]) for layer in sorted(train_feats)}
    best = _pick_best(layers)
    oracle = max(sorted(layers), key=lambda layer: layers[layer]["acc"])
    out = {"layers": layers, "best_layer": best, "best_acc": layers[best]["acc"], "oracle_layer": oracle,
           "oracle_acc": layers[oracle]["acc"], "concat": None, "labels_per_class": cfg.labels_per_class,
           "repeats": cfg.repeats, "subsets": [idx.tolist() for idx in picks]}
    if cfg.concat > 1:
        group = concat_layers(best, len(layers), cfg.concat)
        test_x = _concat(test_feats, group)
        out["concat"] = {"layers": group, **_aggregate([
            logistic_probe(_concat(train_feats, group, idx), np.asarray(train_y)[idx], test_x, test_y, cfg, **kw)
            for idx in picks])}
    return out


def probe_features(train_feats: dict[int, np.ndarray], train_y: np.ndarray, test_feats: dict[int, np.ndarray],
                   test_y: np.ndarray, cfg: ProbeConfig, **kw: Any) -> dict[str, Any]:
    """``low_data_probe`` when ``cfg.labels_per_class`` is set, else ``probe_layers``."""
    run = low_data_probe if cfg.labels_per_class else probe_layers
    return run(train_feats, train_y, test_feats, test_y, cfg, **kw)


def format_table(metrics: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """The per-layer table printed by ``igpt probe``: test accuracy per subset (mean +- std in the
    low-data setting), chosen L2, validation accuracy, the best layer marked; ``baseline`` adds a column
    (e.g. the same architecture at random initialisation)."""
    layers = metrics["layers"]
    names = list(next(iter(layers.values()))["accs"])
    head = "layer" + "".join(f"{'acc ' + n:>16}" for n in names) + (f"{'init acc':>12}" if baseline else "")
    lines = [head + f"{'L2':>10}{'val acc':>10}"]

    def row(label: str, r: dict[str, Any], base: dict[str, Any] | None) -> str:
        std = f" +-{r['std']:.3f}" if "std" in r else ""
        texts = [f"{r['accs'][n]:.4f}" + (std if i == 0 else "") for i, n in enumerate(names)]
        cells = "".join(f"{t:>16}" for t in texts)
        l2 = r["l2"] if isinstance(r["l2"], float) else float(np.median(r["l2"]))
        val = "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        init = f"{base['acc']:>12.4f}" if base else ""
        return f"{label:>5}{cells}{init}{l2:>10.0e}{val:>10}"

    for layer, r in layers.items():
        base = baseline["layers"].get(layer) if baseline else None
        lines.append(row(str(layer), r, base) + ("  <- best" if layer == metrics["best_layer"] else ""))
    if metrics.get("concat"):
        c = metrics["concat"]
        base = baseline.get("concat") if baseline else None
        lines.append(row("cat", c, base) + f"  layers {c['layers'][0]}..{c['layers'][-1]} concatenated")
    return "\n".join(lines)


def probe_checkpoint(checkpoint: str | Path, data: str, out_dir: str | Path, cfg: ProbeConfig = ProbeConfig(),
                     feat_cfg: FeatureConfig = FeatureConfig(), *, resize: str = "center", overwrite: bool = False,
                     any_palette: bool = False, progress: bool = True) -> dict[str, Any]:
    """``igpt probe``: features of every layer of ``checkpoint`` (any weights ``igpt.load`` reads) on the
    whole train split ("train_all") and the test split of ``data`` (cached in ``out_dir``), the probe,
    ``metrics.json`` and ``probe.png``. An ``out_dir`` holding anything but cached features (a finished probe's
    results) is refused unless ``overwrite``; cached features, and an extraction a signal stopped part-way,
    are reused either way."""
    out = Path(out_dir)
    if out.is_dir() and not overwrite:
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith(("feats-", ".")))
        if held:
            raise ValueError(f"--out {out} already holds {held[0]}; pass --overwrite to replace the results (cached "
                             "features are reused), or choose another --out")
    check_output(out, "--out", overwrite=True)
    ckpt_dir, (model, palette, record) = load_located(checkpoint)
    feat_cfg = for_reading(feat_cfg, record.reading)
    side = palette.pixel_side(model.config.n_px)  # the image side its tokenizer reads
    images = {split: open_labelled(data, split, n_px=side, palette=palette, resize=resize, any_palette=any_palette)
              for split in ("train_all", "test")}
    subsets: dict[str, np.ndarray | None] = {"all": None}
    if cfg.eval_subset == "lossless":
        subsets = {"lossless": lossless_mask(data, len(images["test"])), "all": None}
    identity = checkpoint_identity(ckpt_dir, record)
    feats = {split: cached_extract(model, im, palette, feat_cfg, split=split, progress=progress,
                                   model_identity=identity, cache_dir=out_dir)
             for split, im in images.items()}
    metrics = probe_features(feats["train_all"], images["train_all"].labels, feats["test"], images["test"].labels,
                             cfg, subsets=subsets, device=resolve_device(feat_cfg.device), progress=progress)
    metrics.update(data=str(data), checkpoint=str(ckpt_dir), objective=record.objective,
                   n_train=len(images["train_all"]), n_test=len(images["test"]), probe=dataclasses.asdict(cfg),
                   features=dataclasses.asdict(feat_cfg))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    accs = {layer: r["acc"] for layer, r in metrics["layers"].items()}
    title = f"linear probe, {next(iter(subsets))} test images: {Path(str(data)).name}, step {record.step}"
    save_png(layer_plot(accs, title), out / "probe.png")
    return metrics
