"""Probe plots: accuracy (%) against layer for any number of named curves (a trained model's linear probe,
the same probe at random initialisation, other probe kinds), drawn with matplotlib on its Agg canvas as
``igpt.viz`` draws everything.

Each curve is ``{layer: accuracy in [0, 1]}``; the layer chosen on validation is marked on every curve
that names one, a concatenation of layers is drawn as a horizontal segment over the layers it joins, and
the chance line (1 / classes) is dashed. The y axis is zoomed to the data (chance included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from igpt.viz import DPI

# the first curves get these colours, in order; a random-init curve is drawn grey whatever its place
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
BASELINE_COLOUR = "tab:gray"


def probe_curves(metrics: Mapping[str, Any], subset: str | None = None) -> dict[str, dict[str, Any]]:
    """The named curves of a probe run's ``metrics["probes"]`` ({name: probe result}): for each probe its
    per-layer test accuracy (on ``subset``, default the first), chosen layer and concatenation."""
    curves = {}
    for name, result in metrics["probes"].items():
        # the attentive probe scores all test images only: its curve is drawn on those
        pick = (lambda r: r["accs"][subset] if "accs" in r else r["test_acc"]) if subset else (lambda r: r["test_acc"])
        curve: dict[str, Any] = {"accs": {int(layer): pick(r) for layer, r in result["layers"].items()},
                                 "best_layer": result.get("best_layer")}
        if result.get("concat"):
            curve["concat"] = (result["concat"]["layers"], pick(result["concat"]))
        curves[name] = curve
    return curves


def _style(name: str, index: int) -> dict[str, Any]:
    if "random init" in name or "init" in name.split():
        return {"color": BASELINE_COLOUR, "ls": "--", "marker": "s", "ms": 4}
    return {"color": COLOURS[index % len(COLOURS)], "ls": "-", "marker": "o", "ms": 4}


def layer_accuracy_plot(curves: Mapping[str, Mapping[str, Any] | Mapping[int, float]], title: str, *,
                        chance: float | None = None, size: tuple[float, float] = (8.0, 5.0)) -> Image.Image:
    """A PNG-ready image of accuracy (%) against layer. ``curves`` maps a legend name to either
    ``{layer: acc}`` or ``{"accs": {layer: acc}, "best_layer": l or None, "concat": ([layers], acc) or
    None}``."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    values: list[float] = []
    layers_seen: set[int] = set()
    for i, (name, curve) in enumerate(curves.items()):
        full = curve if "accs" in curve else {"accs": curve}
        accs = {int(layer): float(a) for layer, a in full["accs"].items()}
        if not accs:
            continue
        xs = sorted(accs)
        ys = [100 * accs[x] for x in xs]
        style = _style(name, i)
        ax.plot(xs, ys, label=name, lw=1.6, **style)
        values += ys
        layers_seen.update(xs)
        best = full.get("best_layer")
        if best is not None and int(best) in accs:
            b = int(best)
            ax.plot([b], [100 * accs[b]], marker="*", ms=15, color=style["color"], mec="black", mew=0.6,
                    ls="none", label=f"{name}: layer {b} (chosen on validation), {100 * accs[b]:.1f}%")
        concat = full.get("concat")
        if concat:
            group, acc = concat
            ax.hlines(100 * acc, min(group) - 0.3, max(group) + 0.3, colors=style["color"], lw=3, alpha=0.6,
                      label=f"{name}: layers {min(group)}-{max(group)} concatenated, {100 * acc:.1f}%")
            values.append(100 * acc)
    if chance is not None:
        ax.axhline(100 * chance, color="black", lw=0.9, ls=":", label=f"chance ({100 * chance:.1f}%)")
        values.append(100 * chance)
    if values:
        lo, hi = min(values), max(values)
        pad = max(1.0, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    if layers_seen:
        ticks = sorted(layers_seen)
        step = max(1, int(np.ceil(len(ticks) / 25)))  # at most ~25 labels
        ax.set_xticks(ticks[::step])
    ax.set(xlabel="layer (0 = embedding; last = final norm)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=8)  # never over the curves
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def chance_level(labels: Sequence[int] | np.ndarray) -> float:
    """1 / the number of classes of ``labels``."""
    return 1.0 / max(1, len(np.unique(np.asarray(labels))))
