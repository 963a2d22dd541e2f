"""The minibatch linear probe (the paper's ImageNet protocol): SGD with momentum 0.9 and a cosine schedule,
a learning-rate search over a grid, minibatches streamed from memory-mapped features.

It minimises exactly the objective of the L-BFGS probe (``igpt.eval.probe``): mean cross-entropy +
l2 / 2 ||W||^2 (bias unpenalised) on features standardised with the fitting rows' mean and standard
deviation, in the same coordinates, so that on a problem both can solve the two agree.

Standardising fixes each feature's scale but not their correlations: a trained model's pooled features
are strongly correlated (the demo's 128 standardised features have covariance eigenvalues from 56 down
to 5e-5), and plain SGD then crawls along the weak directions, still far from the minimum after
thousands of steps at the weak penalties the probes pick. So the weight gradient is preconditioned by
(S + l2 I)^-1, S the second moment of the standardised fitting rows (``Preconditioner``): SGD with
momentum in the coordinates where the penalised objective's curvature is about 1 in every direction
(the cross-entropy's Hessian is at most about S / 2, the penalty's is l2 I). One learning-rate grid
({3, 1, 0.3, 0.1}) then suits every model and width; momentum 0.9 is stable below a rate of about
2 (1 + 0.9) / 1 = 3.8 there, so the paper's 30 and 10 (rates for its own, unstated feature scale) would
diverge.

``Rows`` reads rows of one layer, or of several concatenated, from arrays or memory maps; below
``IN_MEMORY_VALUES`` values it copies them once to the device, above it reads each minibatch from disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IN_MEMORY_VALUES = 100_000_000  # 400 MB in float32
CHUNK = 4096  # rows per read when statistics or predictions stream over a split
MIN_STEPS = 2000  # a fit takes at least this many steps, however few images (a small problem converges too)
COVARIANCE_ROWS = 65_536  # rows the preconditioner's second moment is estimated on


class Rows:
    """Rows of the column blocks ``columns`` (arrays (N, D_i), e.g. one memory map per layer), concatenated
    along features, as float32 tensors on ``device``."""

    def __init__(self, columns: Sequence[Any], device: torch.device) -> None:
        self.columns, self.device = list(columns), device
        self.n = len(self.columns[0])
        self.d = sum(c.shape[1] for c in self.columns)
        if any(len(c) != self.n for c in self.columns):
            raise ValueError("feature blocks of different lengths cannot be concatenated")
        self._all: torch.Tensor | None = None
        if self.n * self.d <= IN_MEMORY_VALUES:
            self._all = self._read(np.arange(self.n))

    def _read(self, index: np.ndarray) -> torch.Tensor:
        whole = len(index) == self.n and bool(np.all(index == np.arange(self.n)))
        # all rows: read each file straight into float32 (one copy); one block: no concatenation copy
        parts = [np.array(c if whole else c[index], dtype=np.float32) for c in self.columns]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return torch.from_numpy(rows).to(self.device)

    def take(self, index: np.ndarray) -> torch.Tensor:
        """(len(index), D) float32; a sorted index reads a memory map in file order."""
        if self._all is not None:
            return self._all[torch.as_tensor(index, device=self.device)]
        return self._read(np.sort(index) if not np.all(index[:-1] <= index[1:]) else index)

    def everything(self) -> torch.Tensor:
        """All rows (N, D), without a copy when they are held in memory."""
        return self._all if self._all is not None else self._read(np.arange(self.n))

    def stats(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) standard deviation per feature of the rows ``index``, in one streamed pass,
        accumulated in float64; like ``torch.std`` on those rows, constant features get 1e-6."""
        total = torch.zeros(self.d, dtype=torch.float64, device=self.device)
        squares = torch.zeros_like(total)
        for start in range(0, len(index), CHUNK):
            x = self.take(index[start:start + CHUNK]).double()
            total += x.sum(0)
            squares += (x * x).sum(0)
        n = len(index)
        mean = total / n
        var = (squares - n * mean * mean).clamp_min(0) / max(1, n - 1)
        return mean.float(), var.sqrt().float().clamp_min(1e-6)


class Scaler:
    """x -> (x - mean) / std: the standardised coordinates both probes fit in."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Preconditioner:
    """g -> (S + l2 I)^-1 g for a weight gradient g (D, C), S = U diag(lam) U^T the second moment of the
    standardised rows ``index`` (at most ``COVARIANCE_ROWS`` of them, evenly spaced: an estimate is all
    a preconditioner needs), eigendecomposed once in float64 and applied for any l2 as two (D, D)
    products."""

    def __init__(self, rows: Rows, index: np.ndarray, scaler: Scaler) -> None:
        picked = index[::max(1, math.ceil(len(index) / COVARIANCE_ROWS))]
        second = torch.zeros(rows.d, rows.d, dtype=torch.float64, device=rows.device)
        for start in range(0, len(picked), CHUNK):
            x = scaler(rows.take(picked[start:start + CHUNK])).double()
            second += x.T @ x
        second /= max(1, len(picked))
        lam, u = torch.linalg.eigh(second)
        del second
        self.lam, self.u = lam.clamp_min(0).float(), u.float()

    def __call__(self, g: torch.Tensor, l2: float) -> torch.Tensor:
        # the floor keeps --l2 0 finite where features are constant or fewer rows than features leave S
        # singular (the gradient has no component there, and 1e-6 is the grid's weakest strength)
        return self.u @ ((self.u.T @ g) / (self.lam + l2).clamp_min(1e-6)[:, None])


def objective(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean cross-entropy + l2 / 2 ||W||^2."""
    return F.cross_entropy(logits, y) + 0.5 * l2 * (w * w).sum()


def sgd_fit(rows: Rows, index: np.ndarray, y: torch.Tensor, scaler: Scaler, n_classes: int, l2: float, lr: float,
            *, precond: Preconditioner | None, epochs: int, batch_size: int, seed: int,
            init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W (D, C), b (C,)) after ``epochs`` passes of SGD (momentum 0.9, learning rate ``lr`` decayed to 0 by
    a cosine over all steps, shuffled minibatches seeded by ``seed``) over the rows ``index`` (labels
    ``y[index]``), from zeros or ``init``, the weight gradient preconditioned by ``precond`` (None: plain
    SGD); None when the loss diverges."""
    device = rows.device
    w = torch.zeros(rows.d, n_classes, device=device) if init is None else init[0].clone()
    b = torch.zeros(n_classes, device=device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(index) / batch_size)
    epochs = max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))  # small splits: enough steps to converge
    total = epochs * steps_per_epoch
    rng = np.random.default_rng(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = index[rng.permutation(len(index))]
            for start in range(0, len(order), batch_size):
                batch = np.sort(order[start:start + batch_size])
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = objective(scaler(rows.take(batch)) @ w + b, y[torch.as_tensor(batch, device=device)], w, l2)
                if not torch.isfinite(loss):
                    return None
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if precond is not None:
                    w.grad = precond(w.grad, l2)  # momentum then accumulates preconditioned steps
                opt.step()
                step += 1
    return w.detach(), b.detach()


@torch.no_grad()
def predict(rows: Rows, index: np.ndarray, scaler: Scaler, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Predicted classes (len(index),) of the rows ``index``, streamed."""
    out = [(scaler(rows.take(index[s:s + CHUNK])) @ wb[0] + wb[1]).argmax(1) for s in range(0, len(index), CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=rows.device)


def choose_lr(rows: Rows, fit_i: np.ndarray, val_i: np.ndarray | None, y: torch.Tensor, scaler: Scaler,
              n_classes: int, l2: float, lr_grid: Sequence[float], *, precond: Preconditioner | None, epochs: int,
              batch_size: int, seed: int, init: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[float, float | None, float | None, tuple[torch.Tensor, torch.Tensor]]:
    """(lr, validation accuracy, validation log-loss, weights) of the learning rate of ``lr_grid`` whose fit
    on the rows ``fit_i`` at strength ``l2`` scores the lowest cross-entropy on the validation rows
    ``val_i``: the paper's search of the rate on a validation carve. The score is the mean log-loss rather
    than accuracy: a proper score that moves with every example's probability, so that among rates which
    all reach nearly the same minimum it does not pick one by a few flipped predictions (accuracy ties and
    jitters on a small carve). With ``val_i`` None (no validation rows) the rate reaching the lowest
    training objective is kept, and the accuracy and log-loss are None."""
    best: tuple[float, float, tuple[torch.Tensor, torch.Tensor]] | None = None
    for lr in lr_grid:
        wb = sgd_fit(rows, fit_i, y, scaler, n_classes, l2, lr, precond=precond, epochs=epochs,
                     batch_size=batch_size, seed=seed, init=init)
        if wb is None:
            continue  # diverged: a smaller rate follows
        score = (full_objective(rows, fit_i, y, scaler, wb, l2) if val_i is None
                 else full_objective(rows, val_i, y, scaler, wb, 0.0))
        if not math.isfinite(score):
            continue
        if best is None or score < best[1]:
            best = (lr, score, wb)
    if best is None:
        raise ValueError(f"the SGD probe diverged at every learning rate of --sgd-lr-grid {list(lr_grid)}; add "
                         "smaller ones")
    lr, score, wb = best
    if val_i is None:
        return lr, None, None, wb
    yv = y[torch.as_tensor(val_i, device=y.device)]
    return lr, (predict(rows, val_i, scaler, wb) == yv).float().mean().item(), score, wb


@torch.no_grad()
def full_objective(rows: Rows, index: np.ndarray, y: torch.Tensor, scaler: Scaler,
                   wb: tuple[torch.Tensor, torch.Tensor], l2: float) -> float:
    """The objective over all the rows ``index`` (streamed); with ``l2`` 0 their mean cross-entropy."""
    total = 0.0
    for s in range(0, len(index), CHUNK):
        part = index[s:s + CHUNK]
        logits = scaler(rows.take(part)) @ wb[0] + wb[1]
        total += F.cross_entropy(logits, y[torch.as_tensor(part, device=y.device)], reduction="sum").item()
    return total / len(index) + 0.5 * l2 * float((wb[0] * wb[0]).sum())
