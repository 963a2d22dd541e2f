"""``igpt demo``: the whole pipeline on scikit-learn's bundled handwritten digits (real data, offline).

palette fit -> prepare (ids cache) -> AR pretraining -> ridge probe on every layer against the same model
at initialisation -> a grid of samples. About two minutes on two CPU cores.

The digits are 8x8 greyscale with 17 intensity levels, so a 512-colour palette cannot exist for them; the
demo fits 16 colours (k-means merges two neighbouring greys). Everything else is the paper's pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import check_writable, remove_dir, write_json
from igpt.config import DataConfig, FeatureConfig, ModelConfig, TrainConfig
from igpt.data.open import open_split, prepare
from igpt.eval.features import extract
from igpt.eval.ridge_probe import probe_all_layers
from igpt.generate.sample import sample
from igpt.lock import LOCK_FILE, DirLock
from igpt.model import GPT
from igpt.palette import Palette
from igpt.train.pretrain import pretrain
from igpt.viz import grid, layer_plot, save_png
from igpt.weights.convert import load

log = logging.getLogger(__name__)
DEMO_K = 16
DEMO_MARK = ".igpt-demo"  # marks a directory the demo wrote, which a later demo may replace


def probe_model(model: GPT, palette: Palette, data_dir: str, n_px: int) -> dict[str, Any]:
    """Ridge probe of every layer: fitted on train+val, scored on the test split."""
    feats, labels = {}, {}
    for split in ("train_all", "test"):
        images = open_split(data_dir, split, n_px=n_px)
        found = extract(model, images, palette, FeatureConfig(device="cpu"), progress=False)
        feats[split] = {layer: torch.from_numpy(f) for layer, f in found.items()}
        labels[split] = torch.as_tensor(np.array(images.labels, dtype=np.int64))
    return probe_all_layers(feats["train_all"], labels["train_all"], feats["test"], labels["test"])


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
        (out / DEMO_MARK).touch()
        for earlier in (out / "run", out / "data"):  # a fresh run and cache each time the demo is started
            remove_dir(earlier)
        return _demo(out, cfg, seed, progress)


def _demo(out: Path, cfg: TrainConfig, seed: int, progress: bool) -> dict:
    model_cfg = ModelConfig.from_preset("igpt-demo")

    # 1. palette, 2. ids cache
    train = open_split("digits", "train", n_px=model_cfg.n_px, val_fraction=0.0)
    palette = Palette.fit(train.pixels, k=DEMO_K, seed=seed, device="cpu")
    palette.save(out / "palette.npz")
    data_dir = str(out / "data")
    prepare("digits", data_dir, n_px=model_cfg.n_px, palette=palette, seed=seed, progress=False)

    # 3. pretraining
    run_dir = out / "run"
    result = pretrain(model_cfg, cfg, DataConfig(data=data_dir, palette=str(out / "palette.npz")), run_dir,
                      progress=progress)
    model, palette, _ = load(run_dir)

    # 4. probes: trained vs the same architecture at initialisation
    probe = probe_model(model, palette, data_dir, model_cfg.n_px)
    torch.manual_seed(seed)
    baseline = probe_model(GPT(model.config).eval(), palette, data_dir, model_cfg.n_px)
    save_png(layer_plot(probe["acc"], "digits: ridge-probe test accuracy per layer (blue: trained, grey: init)",
                        baseline["acc"]), out / "probe.png")

    # 5. samples
    ids = sample(model, 64, generator=torch.Generator().manual_seed(seed))
    pixels = palette.decode(ids).view(64, model_cfg.n_px, model_cfg.n_px, 3).numpy()
    save_png(grid(pixels, ncol=8, scale=4, title=f"64 samples · seed {seed}"),
             out / "samples.png")

    summary = {"val_loss_nats": result.get("val", {}).get("loss"), "train_loss_nats": result["train"]["loss"],
               "probe_acc": probe["acc"], "probe_acc_init": baseline["acc"], "best_layer": probe["best_layer"],
               "checkpoint": result["checkpoint"]}
    write_json(out / "summary.json", summary)
    _print_summary(out, summary)
    return summary


def _print_summary(out: Path, s: dict[str, Any]) -> None:
    print(f"\nvalidation loss {s['val_loss_nats']:.4f} nats/token (uniform over {DEMO_K} ids: "
          f"{np.log(DEMO_K):.4f})")
    print("layer  probe acc (trained)  probe acc (init)")
    for layer, acc in s["probe_acc"].items():
        mark = "  <- best" if layer == s["best_layer"] else ""
        print(f"{layer:>5}  {acc:>19.3f}  {s['probe_acc_init'][layer]:>16.3f}{mark}")
    print(f"\noutputs in {out}/: samples.png, probe.png, summary.json, run/ (checkpoint, metrics.jsonl)")
