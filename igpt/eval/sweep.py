"""Probe accuracy against validation loss over a run's checkpoints (the paper's Figure 3): ``igpt probe
--checkpoint RUN --all-checkpoints``.

Every kept checkpoint of the run (``RUN/checkpoints/step-*``; ``igpt pretrain --keep-every N`` keeps every
N-th step's) is scored (``igpt.eval.score``: mean NLL in nats per token) and probed on every layer
(``igpt.eval.probe.probe_checkpoint``, the best layer chosen on validation). The loss is that of the run's own
validation split when ``--data`` is the run's data: the ``val`` split of ``--data``, or the carve of train
made with the run's ``--val-fraction`` and ``--seed`` (read from RUN/run.json) when the data has none.

Output layout (``--out OUT``)::

    step-NNNNNNN/   one checkpoint's probe (metrics.json, probe.png, cached features) and score.json
    sweep.json      one row per checkpoint: step, validation loss, best layer, its validation and test accuracy
    sweep.csv       the same rows
    sweep.png       best-layer test accuracy (%) against validation loss (nats/token), each point labelled by step

Resumable: a checkpoint whose ``score.json`` and ``metrics.json`` are already in OUT, made from the same
checkpoint, data and probe settings, is read back instead of being probed again (``score.json`` is written
last, so an interrupted checkpoint is redone). A folder holding another checkpoint's or setting's results
is refused unless ``--overwrite``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from igpt.atomic import read_json, write_json, write_text
from igpt.config import EvalDataConfig, FeatureConfig, ProbeConfig, ScoreConfig
from igpt.eval.probe_run import probe_checkpoint
from igpt.eval.score import score
from igpt.viz import DPI, save_png
from igpt.weights.checkpoint import checkpoint_step, is_checkpoint, step_checkpoints

SWEEP_JSON, SWEEP_CSV, SWEEP_PNG, SCORE_JSON = "sweep.json", "sweep.csv", "sweep.png", "score.json"
COLUMNS = ("step", "val_loss", "val_bits", "best_layer", "best_val_acc", "best_acc", "checkpoint")


def run_checkpoints(run: str | Path) -> list[Path]:
    """The kept step checkpoints of a run directory, oldest first, or a one-line error."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"--checkpoint {run}: no such run directory")
    if is_checkpoint(run):
        raise ValueError(f"--checkpoint {run} is one checkpoint; --all-checkpoints sweeps a run directory (the "
                         "folder holding checkpoints/step-*)")
    found = step_checkpoints(run)
    if not found:
        raise ValueError(f"--checkpoint {run}: no kept checkpoints (checkpoints/step-*) to sweep; pretrain with "
                         "--keep-every N to keep every N-th step's")
    return found


def _eval_data(run: Path, data: str, resize: str, any_palette: bool) -> EvalDataConfig:
    """The run's validation split of ``data``: its val split, or the carve pretraining made (run.json)."""
    recorded = read_json(run / "run.json") if (run / "run.json").is_file() else {}
    val_fraction = recorded.get("data", {}).get("val_fraction", 0.1)
    seed = recorded.get("train", {}).get("seed", 0)
    return EvalDataConfig(data=data, split="val", val_fraction=val_fraction or 0.1, split_seed=seed, resize=resize,
                          any_palette=any_palette)


def _finished(sub: Path, ckpt: Path, data: str, cfg: ProbeConfig, overwrite: bool) -> dict[str, Any] | None:
    """The earlier results in ``sub`` when they are this checkpoint's with these settings; None when there
    are none (or half of them, from an interrupted sweep); an error when they are another's."""
    if not (sub / SCORE_JSON).is_file() or not (sub / "metrics.json").is_file():
        return None
    metrics = read_json(sub / "metrics.json")
    same = (metrics.get("checkpoint") == str(ckpt) and metrics.get("data") == str(data)
            and metrics.get("probe") == dataclasses.asdict(cfg))
    if same:
        return {"metrics": metrics, "score": read_json(sub / SCORE_JSON)}
    if overwrite:
        return None
    raise ValueError(f"--out {sub} holds a probe of another checkpoint, data or probe setting; pass --overwrite "
                     "to redo it, or choose another --out")


def sweep_checkpoints(run: str | Path, data: str, out_dir: str | Path, cfg: ProbeConfig = ProbeConfig(),
                      feat_cfg: FeatureConfig = FeatureConfig(), *, resize: str = "center", any_palette: bool = False,
                      overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score and probe every kept checkpoint of ``run`` (see the module docstring); returns (and writes to
    ``out_dir/sweep.json``) {"run", "data", "split", "rows": [{step, val_loss, val_bits, best_layer,
    best_val_acc, best_acc, checkpoint}], "skipped": [steps read back from an earlier sweep]}."""
    run, out = Path(run), Path(out_dir)
    ckpts = run_checkpoints(run)
    eval_data = _eval_data(run, data, resize, any_palette)
    score_cfg = ScoreConfig(batch_size=feat_cfg.batch_size, device=feat_cfg.device, dtype=feat_cfg.dtype)
    rows, skipped, split = [], [], None
    for ckpt in tqdm(ckpts, desc="sweep", unit="checkpoint", disable=not progress):
        step = checkpoint_step(ckpt)
        sub = out / f"step-{step:07d}"
        done = _finished(sub, ckpt, data, cfg, overwrite)
        if done is None:
            report = score(ckpt, eval_data, score_cfg, progress=progress)
            metrics = probe_checkpoint(ckpt, data, sub, cfg, feat_cfg, resize=resize, overwrite=True,
                                       any_palette=any_palette, progress=progress)
            write_json(sub / SCORE_JSON, report)  # last: its presence marks the checkpoint done
            done = {"metrics": metrics, "score": report}
        else:
            skipped.append(step)
        m, s = done["metrics"], done["score"]
        split = s["split"]
        rows.append({"step": step, "val_loss": s["nats_per_token"], "val_bits": s["bits_per_token"],
                     "best_layer": m["best_layer"], "best_val_acc": m["best_val_acc"], "best_acc": m["best_test_acc"],
                     "checkpoint": str(ckpt)})
    result = {"run": str(run), "data": str(data), "split": split, "objective": done["score"]["objective"],
              "rows": rows, "skipped": skipped}
    write_json(out / SWEEP_JSON, result)
    write_text(out / SWEEP_CSV, _csv(rows))
    title = f"probe accuracy against validation loss: {run.name} on {Path(str(data)).name}"
    save_png(sweep_plot(rows, title), out / SWEEP_PNG)
    return result


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def sweep_plot(rows: list[dict[str, Any]], title: str) -> Image.Image:
    """Best-layer test accuracy (%) against validation loss (nats/token), one point per checkpoint labelled
    by its step, joined in step order; the loss axis is reversed, so training runs left to right."""
    fig = Figure(figsize=(6.4, 4.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    loss = np.array([r["val_loss"] for r in rows])
    acc = 100 * np.array([r["best_acc"] for r in rows])
    ax.plot(loss, acc, color="tab:blue", lw=1.2, marker="o", ms=6,
            label="best layer, chosen on validation (points labelled by step)")
    for r, x, y in zip(rows, loss, acc):  # short labels: the late points crowd together
        ax.annotate(str(r["step"]), (x, y), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.set(xlabel="validation loss (nats/token)", ylabel="linear probe test accuracy (%)", title=title)
    ax.invert_xaxis()  # lower loss to the right, as training goes
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", frameon=False)
    agg = FigureCanvasAgg(fig)
    agg.draw()
    return Image.fromarray(np.asarray(agg.buffer_rgba())[..., :3].copy())


def format_sweep(result: dict[str, Any]) -> str:
    """The printed table: one row per checkpoint."""
    lines = [f"{'step':>8}{'val loss':>10}{'val bits':>10}{'best layer':>12}{'val acc':>10}{'test acc':>10}"]
    for r in result["rows"]:
        val = "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f}"
        lines.append(f"{r['step']:>8}{r['val_loss']:>10.4f}{r['val_bits']:>10.4f}{r['best_layer']:>12}{val:>10}"
                     f"{r['best_acc']:>10.4f}")
    return "\n".join(lines)
