"""``igpt demo``: the whole pipeline on scikit-learn's bundled handwritten digits (real data, offline).

palette fit -> prepare (ids cache) -> AR pretraining -> the linear probe of ``igpt probe`` on every layer,
against the same architecture at initialisation -> a grid of samples. About two minutes on two CPU cores.

The digits are 8x8 greyscale with 17 intensity levels, so a 512-colour palette cannot exist for them; the
demo fits 16 colours (k-means merges two neighbouring greys). Everything else is the paper's pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import check_writable, write_bytes, write_json
from igpt.config import DataConfig, FeatureConfig, ModelConfig, ProbeConfig, TrainConfig
from igpt.data.open import open_split, prepare
from igpt.eval.probe import format_table
from igpt.eval.probe_run import LINEAR, LINEAR_INIT, probe_checkpoint
from igpt.generate.sample import sample
from igpt.lock import LOCK_FILE, DirLock, remove_unheld
from igpt.tokenizers import Palette
from igpt.train.pretrain import pretrain
from igpt.viz import grid, save_png
from igpt.weights.convert import load

log = logging.getLogger(__name__)
DEMO_K = 16
DEMO_MARK = ".igpt-demo"  # marks a directory the demo wrote, which a later demo may replace


def run_demo(out_dir: str | Path = "igpt-demo", steps: int = 300, seed: int = 0, progress: bool = True) -> dict:
    """The whole pipeline into ``out_dir``: a new directory, or one an earlier demo wrote (whose outputs are
    replaced). Anything else is refused, so a mistyped ``--out`` never loses a user's files."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    # built (and so checked, the seed included) before anything is written
    cfg = TrainConfig(batch_size=64, max_steps=steps, lr=3e-3, eval_every=max(1, steps // 4), eval_batches=0,
                      ckpt_every=steps, log_every=10, seed=seed, device="cpu")
    out = Path(out_dir)
    check_writable(out, "--out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not (out / DEMO_MARK).exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty and was not written by igpt demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out, "--out"):
        # fresh each time the demo is started, but never from under a process writing one (a resumed run)
        remove_unheld([out / "run", out / "data", out / "probe"], "--out")
        (out / DEMO_MARK).touch()
        return _demo(out, cfg, seed, progress)


def _demo(out: Path, cfg: TrainConfig, seed: int, progress: bool) -> dict:
    model_cfg = ModelConfig.from_preset("igpt-demo")

    # 1. palette, 2. ids cache
    train = open_split("digits", "train", n_px=model_cfg.n_px, val_fraction=0.0)
    palette = Palette.fit(train.pixels, k=DEMO_K, seed=seed, device="cpu")
    palette.save(out / "palette.npz")
    data_dir = str(out / "data")
    prepare("digits", data_dir, n_px=model_cfg.n_px, tokenizer=palette, seed=seed, progress=False)

    # 3. pretraining
    run_dir = out / "run"
    result = pretrain(model_cfg, cfg, DataConfig(data=data_dir, tokenizer=str(out / "palette.npz")), run_dir,
                      progress=progress)
    model, tokenizer, _ = load(run_dir)

    # 4. the linear probe of igpt probe, trained vs the same architecture at initialisation
    probe = probe_checkpoint(run_dir, data_dir, out / "probe", ProbeConfig(baseline=True, seed=seed),
                             FeatureConfig(device="cpu"), overwrite=True, progress=False)
    write_bytes(out / "probe.png", (out / "probe" / "probe.png").read_bytes())

    # 5. samples
    ids = sample(model, 64, generator=torch.Generator().manual_seed(seed))
    pixels = tokenizer.decode(ids).view(64, model_cfg.n_px, model_cfg.n_px, 3).numpy()
    save_png(grid(pixels, ncol=8, scale=4, title=f"64 samples · seed {seed}"),
             out / "samples.png")

    trained, init = probe["probes"][LINEAR], probe["probes"][LINEAR_INIT]
    summary = {"val_loss_nats": result.get("val", {}).get("loss"), "train_loss_nats": result["train"]["loss"],
               "probe_acc": {layer: r["test_acc"] for layer, r in trained["layers"].items()},
               "probe_acc_init": {layer: r["test_acc"] for layer, r in init["layers"].items()},
               "best_layer": trained["best_layer"], "best_val_acc": trained["best_val_acc"],
               "best_test_acc": trained["best_test_acc"], "checkpoint": result["checkpoint"]}
    write_json(out / "summary.json", summary)
    _print_summary(out, summary, probe)
    return summary


def _print_summary(out: Path, s: dict[str, Any], probe: dict[str, Any]) -> None:
    print(f"\nvalidation loss {s['val_loss_nats']:.4f} nats/token (uniform over {DEMO_K} ids: "
          f"{np.log(DEMO_K):.4f})")
    print(format_table(probe["probes"][LINEAR], baseline=probe["probes"][LINEAR_INIT]))
    print(f"\nlayer {s['best_layer']} chosen on validation (val accuracy {s['best_val_acc']:.3f}): test accuracy "
          f"{s['best_test_acc']:.3f}")
    print(f"outputs in {out}/: samples.png, probe.png, summary.json, probe/ (metrics.json, features), run/ "
          "(checkpoint, metrics.jsonl)")
