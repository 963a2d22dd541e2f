"""Weighted k-means on points in R^d, on any device: k-means++ seeding from a sample, then Lloyd iterations
over (point, weight) pairs, distances computed in row blocks so that memory stays bounded. The palette
(``igpt.tokenizers.palette``) fits its colours with it, on the distinct colours of the pixels and their counts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm import tqdm

_INIT_SAMPLE = 100_000  # k-means++ seeds from at most this many distinct colours; Lloyd then uses all of them
# Rows per (rows, K) distance block. On CPU, 2048 rows (4 MiB at K=512) stay in cache and run several times
# faster than 1 << 18 rows; a GPU wants big blocks to stay busy (1 << 18 rows: 512 MiB at K=512).
_CPU_CHUNK = 2048
_ACCEL_CHUNK = 1 << 18


class LloydResult(NamedTuple):
    centers: torch.Tensor  # (K, 3) float32, on the device the points live on
    labels: torch.Tensor  # (U,) int64, nearest centre of each point under `centers`
    inertia: float  # weighted mean of ||x - c_label||^2, per pixel (summed over the 3 channels)
    iters_run: int  # centre updates performed



def nearest(x: torch.Tensor, centers: torch.Tensor, c_sq: torch.Tensor, ramp: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for each row of x (n, 3): argmin_k ||c_k||^2 - 2 x.c_k, first on ties.

    c_sq is ||c_k||^2 (K,) and ramp is arange(K) as float32, both on x's device.
    """
    k = centers.shape[0]
    d = torch.addmm(c_sq, x, centers.T, alpha=-2)  # (n, K)
    best = d.amin(1, keepdim=True)  # (n, 1)
    # Same result as d.argmin(1), but twice as fast on CPU, where argmin over the last dim is not vectorised
    # and amin is: minimal entries become their index j, the others K + j, and the smallest is the answer.
    return d.ne_(best).mul_(k).add_(ramp).amin(1).to(torch.int64)


def assign(points: torch.Tensor, centers: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each point (U, 3) float32 and its exact squared distance, in blocks of chunk rows."""
    c_sq = (centers * centers).sum(1)  # (K,)
    ramp = torch.arange(centers.shape[0], dtype=torch.float32, device=centers.device)
    labels = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    for s in range(0, points.shape[0], chunk):
        labels[s : s + chunk] = nearest(points[s : s + chunk], centers, c_sq, ramp)
    # Recomputed directly rather than from the expansion, which loses precision for points near a centre.
    sq = (points - centers[labels]).pow(2).sum(1)  # (U,)
    return labels, sq


def unique_colours(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3) -> distinct colours uint8 (U, 3) and how often each occurs, int64 (U,)."""
    p = pixels.to(torch.int32)
    packed = (p[:, 0] << 16) | (p[:, 1] << 8) | p[:, 2]  # (N,) one 24-bit int per colour
    values, counts = torch.unique(packed, return_counts=True)  # sorted, so the result is deterministic
    colours = torch.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], dim=1)
    return colours.to(torch.uint8), counts


def kmeans_pp(points: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) weighted by counts: (U, 3) CPU points -> (k, 3).

    Runs on a seeded subsample of the distinct colours; a uniform sample of them, still weighted by their
    counts, keeps the pixel distribution on average. Points are distinct, so the k picks are distinct.
    """
    n_sample = max(_INIT_SAMPLE, k)
    if points.shape[0] > n_sample:
        keep = torch.randperm(points.shape[0], generator=gen)[:n_sample]
        points, weights = points[keep], weights[keep]
    cols = points.T.contiguous()  # (3, M): column-wise distances are ~8x faster than rows of 3 on CPU
    picks = [draw(weights, gen)]
    d2 = (cols - cols[:, picks[0], None]).pow_(2).sum(0)  # (M,) squared distance to the nearest pick
    for _ in range(1, k):
        picks.append(draw(weights * d2, gen))
        torch.minimum(d2, (cols - cols[:, picks[-1], None]).pow_(2).sum(0), out=d2)
    return points[torch.tensor(picks)].clone()


def draw(weights: torch.Tensor, gen: torch.Generator) -> int:
    """One index drawn with probability proportional to weights (M,) float64; 20x faster than multinomial."""
    cdf = weights.cumsum(0)  # (M,)
    u = torch.rand(1, generator=gen, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[0] - 1))


def update_centers(
    points: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, sq: torch.Tensor, centers: torch.Tensor
) -> torch.Tensor:
    """One weighted Lloyd update; empty clusters move to the points that currently cost the most.

    Runs on the CPU whatever the device: it is O(U), and CPU index_add_ is deterministic where CUDA's
    float atomics are not, so a fixed seed gives the same palette run after run.
    """
    p, w, lab, cost = points.cpu().double(), weights.cpu(), labels.cpu(), sq.cpu().double() * weights.cpu()
    k = centers.shape[0]
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, w)  # (K,)
    sums = torch.zeros(k, 3, dtype=torch.float64).index_add_(0, lab, p * w[:, None])  # (K, 3)
    new = centers.cpu().double()
    alive = mass > 0
    new[alive] = sums[alive] / mass[alive, None]
    dead = (~alive).nonzero().squeeze(1)
    if dead.numel():
        # topk returns distinct points, so distinct dead clusters get distinct new centres.
        new[dead] = p[torch.topk(cost, dead.numel()).indices]
    return new.to(torch.float32).to(centers.device)


def lloyd(
    points: torch.Tensor,
    weights: torch.Tensor,
    centers: torch.Tensor,
    iters: int,
    tol: float = 0.0,
    chunk: int | None = None,
    progress: bool = False,
) -> LloydResult:
    """Weighted Lloyd iterations from `centers` (K, 3) on points (U, 3) float32 with weights (U,).

    Stops after `iters` updates, or once an update lowers the weighted inertia by less than `tol` of
    its previous value. The labels and inertia returned belong to the centres returned.
    """
    weights = weights.to(device=points.device, dtype=torch.float64)
    chunk = default_chunk(points.device) if chunk is None else chunk
    total = float(weights.sum())
    labels, sq = assign(points, centers, chunk)
    inertia = float((sq.double() * weights).sum())
    run = 0
    with tqdm(total=iters, disable=not progress, desc="k-means", unit="iter") as bar:
        for _ in range(iters):
            centers = update_centers(points, weights, labels, sq, centers)
            labels, sq = assign(points, centers, chunk)
            new = float((sq.double() * weights).sum())
            run += 1
            bar.update(1)
            bar.set_postfix(inertia=f"{new / total:.3g}")
            converged = inertia - new <= tol * inertia
            inertia = new
            if converged:
                break
    return LloydResult(centers, labels, inertia / total, run)


def default_chunk(device: torch.device) -> int:
    return _CPU_CHUNK if device.type == "cpu" else _ACCEL_CHUNK


def default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
