"""The quick look the demo takes at every layer: a closed-form ridge classifier on each layer's features
(``igpt.eval.features.extract``). The paper's probe (L-BFGS logistic regression) is ``igpt.eval.probe``."""

from __future__ import annotations

import torch

from igpt.data.splits import split_indices


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> torch.Tensor:
    """Weights (D+1, C) of least squares onto centred one-hot targets with an L2 penalty (bias unpenalised)."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    targets = torch.nn.functional.one_hot(y, n_classes).to(x.dtype) - 1.0 / n_classes
    gram = x1.T @ x1
    penalty = torch.eye(gram.shape[0], dtype=x.dtype) * l2 * len(x)
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(gram + penalty, x1.T @ targets)


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) @ w).argmax(dim=1)


def ridge_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0), val_fraction: float = 0.2,
                seed: int = 0) -> dict[str, float]:
    """Standardise with train statistics, choose the L2 strength on a seeded held-out part of train, refit
    on all of train, and return {"acc": test accuracy, "l2": chosen strength}."""
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("ridge_probe: features and labels differ in length")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tr, te = ((train_x - mean) / std).double(), ((test_x - mean) / std).double()
    fit_i, val_i = (torch.from_numpy(i) for i in split_indices(len(tr), val_fraction, seed))
    scores = {l2: (_predict(_ridge_fit(tr[fit_i], train_y[fit_i], n_classes, l2), tr[val_i]) == train_y[val_i])
              .float().mean().item() for l2 in l2_grid}
    best = max(l2_grid, key=lambda l2: (scores[l2], l2))  # ties go to the stronger penalty
    w = _ridge_fit(tr, train_y, n_classes, best)
    return {"acc": (_predict(w, te) == test_y).float().mean().item(), "l2": best}


def probe_all_layers(train_feats: dict[int, torch.Tensor], train_y: torch.Tensor,
                     test_feats: dict[int, torch.Tensor], test_y: torch.Tensor) -> dict[str, object]:
    """Ridge probe per layer: {"acc": {layer: accuracy}, "best_layer": l, "best_acc": a}."""
    accs = {l: ridge_probe(train_feats[l], train_y, test_feats[l], test_y)["acc"] for l in sorted(train_feats)}
    best = max(accs, key=accs.get)
    return {"acc": accs, "best_layer": best, "best_acc": accs[best]}
