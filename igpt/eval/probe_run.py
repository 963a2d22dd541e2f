"""``igpt probe`` end to end: load a checkpoint, stream the chosen layers' features of the train and test
splits to disk (``igpt.eval.features``), probe every layer one at a time (``igpt.eval.probe``), optionally
the same architecture at random initialisation too, and write ``metrics.json`` and ``probe.png``.

``metrics.json`` keeps each probe's results under a name in ``"probes"`` (``"linear"``, and
``"linear, random init"`` with ``--baseline``), each ``{"layers": {l: {"val_acc", "test_acc", "accs",
"l2", "solver", ...}}, "best_layer", "best_val_acc", "best_test_acc", "concat"}``, so that other probe
kinds sit beside them; the headline is the layer chosen on validation and its test accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import check_output, write_json
from igpt.config import FeatureConfig, ProbeConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import lossless_mask, open_labelled
from igpt.eval.features import (cached_extract, checkpoint_identity, describe_plan, feature_plan, for_reading,
                                parse_layers)
from igpt.eval.plots import chance_level, layer_accuracy_plot, probe_curves
from igpt.eval.probe import check_labels, choose_solver, low_data_subsets, probe_features
from igpt.lock import DirLock
from igpt.model import GPT
from igpt.tokenizers import AnyTokenizer
from igpt.record import CheckpointRecord
from igpt.runtime import resolve_device
from igpt.viz import save_png
from igpt.weights.convert import load_located

log = logging.getLogger(__name__)
LINEAR, LINEAR_INIT = "linear", "linear, random init"
LABELS = {LINEAR: "linear probe", LINEAR_INIT: "linear probe, random init", "attentive": "attentive probe"}  # legend names in probe.png


def voting(model: GPT, feat_cfg: FeatureConfig) -> bool:
    """Whether test predictions are combined by a vote over masks: BERT, masked inputs, K > 1, 'vote'."""
    return not model.causal and feat_cfg.bert_mask and feat_cfg.n_masks > 1 and feat_cfg.mask_combine == "vote"


def model_features(model: GPT, tokenizer: AnyTokenizer, images: dict[str, ImageSet], feat_cfg: FeatureConfig,
                   identity: dict[str, Any], layers: list[int], cache_dir: Path, progress: bool
                   ) -> tuple[Any, Any]:
    """(train features, test features or a list of K test views for a vote), streamed into ``cache_dir``."""
    kw = {"model_identity": identity, "cache_dir": cache_dir, "layers": layers, "progress": progress}
    if not voting(model, feat_cfg):
        return tuple(cached_extract(model, images[s], tokenizer, feat_cfg, split=s, **kw)
                     for s in ("train_all", "test"))
    train = cached_extract(model, images["train_all"], tokenizer, feat_cfg, split="train_all", mask_index=0, **kw)
    views = [cached_extract(model, images["test"], tokenizer, feat_cfg, split="test", mask_index=k, **kw)
             for k in range(feat_cfg.n_masks)]
    return train, views


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir() and not overwrite:
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith(("feats-", ".")))
        if held:
            raise ValueError(f"--out {out} already holds {held[0]}; pass --overwrite to replace the results (cached "
                             "features are reused), or choose another --out")
    check_output(out, "--out", overwrite=True)


def _plan(model: GPT, images: dict[str, ImageSet], feat_cfg: FeatureConfig, cfg: ProbeConfig, layers: list[int],
          baseline: bool) -> dict[str, Any]:
    counts = {"train_all": len(images["train_all"]), "test": len(images["test"])}
    n_fit = cfg.labels_per_class * len(np.unique(images["train_all"].labels)) if cfg.labels_per_class \
        else counts["train_all"]
    width = model.config.n_embd * max(1, cfg.concat)
    plan = feature_plan(model.config, counts, n_layers=len(layers), feats_dtype=feat_cfg.feats_dtype,
                        batch_size=feat_cfg.batch_size, test_views=feat_cfg.n_masks if voting(model, feat_cfg) else 1,
                        concat=cfg.concat, lbfgs=choose_solver(cfg, n_fit, width) == "lbfgs", n_train=n_fit)
    if baseline:
        plan["disk_bytes"] *= 2
    return plan


def probe_checkpoint(checkpoint: str | Path, data: str, out_dir: str | Path, cfg: ProbeConfig = ProbeConfig(),
                     feat_cfg: FeatureConfig = FeatureConfig(), *, resize: str = "center", overwrite: bool = False,
                     any_palette: bool = False, progress: bool = True) -> dict[str, Any]:
    """``igpt probe``: features of ``feat_cfg.layers`` of ``checkpoint`` (any weights ``igpt.load`` reads) on
    the whole train split ("train_all") and the test split of ``data``, streamed to ``out_dir``; the probe
    of every layer; with ``cfg.baseline`` the same for the architecture at random initialisation;
    ``metrics.json`` and ``probe.png``. An ``out_dir`` holding anything but cached features (a finished
    probe's results) is refused unless ``overwrite``; cached features, and an extraction a signal stopped
    part-way, are reused either way."""
    out = Path(out_dir)
    _check_out(out, overwrite)
    ckpt_dir, (model, tokenizer, record) = load_located(checkpoint)
    if feat_cfg.flip_average and tokenizer.kind != "palette":  # a code grid mirrored is not the mirrored image's
        raise ValueError(f"--flip-average mirrors the grid of ids, which mirrors the image only for a palette; "
                         f"{checkpoint} reads {tokenizer.describe()}")
    layers = parse_layers(feat_cfg.layers, model.config.n_layer)  # before any work
    feat_cfg = for_reading(feat_cfg, record.reading)
    side = tokenizer.pixel_side(model.config.n_px)  # the image side its tokenizer reads
    images = {split: open_labelled(data, split, n_px=side, tokenizer=tokenizer, resize=resize, any_palette=any_palette)
              for split in ("train_all", "test")}
    train_y, test_y = images["train_all"].labels, images["test"].labels
    check_labels(train_y, test_y)
    if cfg.labels_per_class:
        low_data_subsets(train_y, cfg)  # a class too small for the subsets fails here, before extraction
    subsets: dict[str, np.ndarray | None] = {"all": None}
    if cfg.eval_subset == "lossless":
        subsets = {"lossless": lossless_mask(data, len(images["test"])), "all": None}
    plan = _plan(model, images, feat_cfg, cfg, layers, cfg.baseline)
    log.info("%s", describe_plan(plan))
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out, "--out"):  # one writer per feature store
        metrics = _run(model, tokenizer, record, ckpt_dir, images, layers, subsets, plan, cfg, feat_cfg, out, progress)
    metrics.update(data=str(data), step=record.step, chance=chance_level(test_y), subset=next(iter(subsets)))
    write_json(out / "metrics.json", metrics)
    write_probe_png(metrics, out)
    return metrics


def write_probe_png(metrics: dict[str, Any], out: Path) -> None:
    """``out/probe.png``: every probe of ``metrics["probes"]`` (the attentive probe's too, once it has run)
    against the layer, on the test images the summary reports."""
    subset = metrics["subset"]
    title = f"probes: {Path(metrics['data']).name} ({subset} test images), step {metrics['step']}"
    named = probe_curves(metrics, None if subset == "all" else subset)  # "all" is each probe's test_acc
    curves = {LABELS.get(name, name): curve for name, curve in named.items()}
    save_png(layer_accuracy_plot(curves, title, chance=metrics["chance"]), out / "probe.png")


def _run(model: GPT, tokenizer: AnyTokenizer, record: CheckpointRecord, ckpt_dir: Path, images: dict[str, ImageSet], layers: list[int],
         subsets: dict[str, np.ndarray | None], plan: dict[str, Any], cfg: ProbeConfig, feat_cfg: FeatureConfig,
         out: Path, progress: bool) -> dict[str, Any]:
    """Features and probes of the checkpoint (and of its random init with ``cfg.baseline``): the metrics."""
    train_y, test_y = images["train_all"].labels, images["test"].labels
    device = resolve_device(feat_cfg.device)
    kw = {"subsets": subsets, "device": device, "progress": progress}
    models = [(LINEAR, model, checkpoint_identity(ckpt_dir, record))]
    if cfg.baseline:
        torch.manual_seed(cfg.seed)
        init = GPT(model.config)
        init.causal = model.causal  # read as the trained model is
        models.append((LINEAR_INIT, init, {"random_init": model.config.to_dict(), "seed": cfg.seed,
                                           "objective": record.objective}))
    probes = {}
    for name, net, identity in models:
        train, test = model_features(net, tokenizer, images, feat_cfg, identity, layers, out, progress)
        probes[name] = probe_features(train, train_y, test, test_y, cfg, **kw)
    main = probes[LINEAR]
    return {"probes": probes, "best_layer": main["best_layer"], "best_val_acc": main["best_val_acc"],
            "best_test_acc": main["best_test_acc"], "layers_probed": layers, "checkpoint": str(ckpt_dir),
            "objective": record.objective, "n_train": len(images["train_all"]), "n_test": len(images["test"]),
            "plan": plan, "probe": dataclasses.asdict(cfg), "features": dataclasses.asdict(feat_cfg)}
