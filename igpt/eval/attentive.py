"""Attentive probes: a frozen trunk cut at layer l, one learned query attending over that layer's token
states, then a linear classifier (AIM, El-Nouby et al. 2024, section 4; not in the iGPT paper, whose probes
are linear on mean-pooled features).

- Trunk: ``GPT.forward_intermediates(ids, layers, intermediates_only=True)``, so blocks past the deepest
  probed layer are never run; its token states (B, T, D) are the linear probe's features before the mean
  over positions (``ln_1(h^l)``, or ``ln_f(h^L)`` for l = L). The trunk runs in eval mode under
  ``torch.no_grad`` (bf16 autocast on GPUs, fp32 on the CPU): no gradient reaches it, and its weights are
  never handed to an optimizer. BERT trunks read masked inputs, as in training and as the linear probe
  reads them (masks drawn from the seed, batch start and epoch; fixed masks for validation and test).
- Head (``AttentiveHead``): a norm on the tokens, multi-head cross-attention from one learned query, a norm,
  a linear classifier. Trained with AdamW (linear warm-up over the first 5% of the steps, then cosine to 0).
- Features are computed on the fly, batch by batch: token-level features of a whole split do not fit on disk
  (T x D per image per layer). One trunk pass per batch feeds every head: one per (layer, learning rate).
- Protocol: the same seeded, class-stratified validation carve of train as the linear probe
  (``--val-fraction``, ``--seed``); the heads train on the rest. After every epoch each head is scored on
  the carve; for each layer the (learning rate, epoch) with the best validation accuracy (the earlier epoch
  and the larger rate on ties) is kept, and that head alone is scored on the test split.
- ``attentive_checkpoint``: what ``igpt probe --attentive`` runs after the linear probe: the results go into
  the same ``metrics.json``, as ``metrics["probes"]["attentive"]``: {"layers": {layer: {"val_acc", "test_acc",
  "lr", "epoch", ...}}, "best_layer", ...}, and as one more curve in ``probe.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from igpt.atomic import read_json, write_json
from igpt.config import AttentiveConfig, FeatureConfig, ProbeConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import open_labelled
from igpt.data.splits import stratified_carve
from igpt.data.streams import to_ids
from igpt.eval.probe_run import write_probe_png
from igpt.model import GPT
from igpt.objectives import sample_keep_mask
from igpt.tokenizers import AnyTokenizer
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype
from igpt.stop import GracefulStop, Stopped
from igpt.weights.convert import load_located

WARMUP_FRACTION = 0.05  # of all steps, before the cosine decay
EVAL_KEY = 7_919  # derives the fixed masks of validation and test (BERT trunks) from the seed
ATTENTIVE = "attentive"  # its name in metrics["probes"], beside the linear probes


class AttentiveHead(nn.Module):
    """Token states (B, T, D) -> class logits (B, C): norm, one learned query attending over the tokens
    (``n_heads`` heads), norm, linear."""

    def __init__(self, d: int, n_classes: int, n_heads: int) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"--attentive-heads {n_heads} does not divide the model width {d}")
        self.norm = nn.LayerNorm(d)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)  # (B, T, D)
        pooled, _ = self.attn(self.query.expand(len(x), -1, -1), x, x, need_weights=False)  # (B, 1, D)
        return self.classifier(self.out_norm(pooled[:, 0]))  # (B, C)


@dataclasses.dataclass
class _Trunk:
    """The frozen model and how it is read."""

    model: GPT
    tokenizer: AnyTokenizer
    layers: list[int]
    device: torch.device
    dtype: torch.dtype
    mask_prob: float | None  # BERT: the rate inputs are masked at; None reads them unmasked

    @torch.no_grad()
    def states(self, images: ImageSet, index: np.ndarray, *keys: int) -> dict[int, torch.Tensor]:
        """{layer: token states (B, T, D) float32} of ``images[index]``; BERT masks drawn from ``keys``."""
        ids = to_ids(images, index, self.tokenizer, self.device)  # (B, T)
        keep = None
        if self.mask_prob is not None:
            keep = sample_keep_mask(tuple(ids.shape), self.mask_prob, derived_generator(*keys), self.device)
        with autocast(self.device, self.dtype):
            feats = self.model.forward_intermediates(ids, self.layers, intermediates_only=True, keep=keep)
        return {layer: f.float() for layer, f in zip(self.layers, feats)}


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, round(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _accuracies(trunk: _Trunk, heads: dict[tuple[int, float], AttentiveHead], images: ImageSet,
                index: np.ndarray, batch_size: int, seed: int) -> dict[tuple[int, float], float]:
    """Accuracy of every head on ``images[index]``, one trunk pass per batch."""
    correct = dict.fromkeys(heads, 0)
    labels = np.asarray(images.labels)
    for head in heads.values():
        head.eval()
    for start in range(0, len(index), batch_size):
        batch = index[start:start + batch_size]
        states = trunk.states(images, batch, seed, EVAL_KEY, start)
        y = torch.from_numpy(labels[batch].astype(np.int64)).to(trunk.device)
        for (layer, lr), head in heads.items():
            correct[layer, lr] += int((head(states[layer]).argmax(1) == y).sum())
    for head in heads.values():
        head.train()
    return {key: n / max(1, len(index)) for key, n in correct.items()}


def attentive_probe(model: GPT, tokenizer: AnyTokenizer, train: ImageSet, test: ImageSet, layers: list[int],
                    cfg: AttentiveConfig = AttentiveConfig(), *, val_fraction: float = 0.1, seed: int = 0,
                    device: str | torch.device = "cpu", dtype: str = "auto", mask_prob: float | None = None,
                    progress: bool = False) -> dict[int, dict[str, Any]]:
    """Train attentive heads on the frozen ``model``'s layers (see the module docstring); returns
    {layer: {"val_acc", "test_acc", "lr", "epoch", "val_curves": {lr: [val acc after each epoch]}}}.
    ``mask_prob`` reads a BERT trunk's inputs masked at that rate. SIGTERM or Ctrl-C stops between batches
    with ``igpt.stop.Stopped`` (nothing is kept: the probe is rerun from the start)."""
    L = model.config.n_layer
    if not layers or min(layers) < 0 or max(layers) > L:
        raise ValueError(f"attentive probe layers must lie in 0..{L}, got {layers}")
    dev = resolve_device(str(device))
    trunk = _Trunk(model.to(dev).eval(), tokenizer.to(dev), sorted(set(layers)), dev, resolve_dtype(dtype, dev),
                   None if model.causal else mask_prob)
    y_all = np.asarray(train.labels).astype(np.int64)
    if len(y_all) == 0 or len(test) == 0 or int(min(y_all.min(), np.min(test.labels))) < 0:
        raise ValueError("attentive probe: train and test need images with labels >= 0")
    n_classes = int(max(y_all.max(), np.max(test.labels))) + 1
    fit_i, val_i = stratified_carve(y_all, val_fraction, seed)
    if len(val_i) == 0:
        raise ValueError("attentive probe: no validation images to choose the epoch and learning rate on "
                         "(--val-fraction 0, or one labelled image per class)")
    with torch.random.fork_rng(devices=[]):  # the heads' initialisation is seeded, the caller's RNG untouched
        torch.manual_seed(seed)
        heads = {(layer, lr): AttentiveHead(model.config.n_embd, n_classes, cfg.attentive_heads).to(dev)
                 for layer in trunk.layers for lr in cfg.lrs}
    opts = {key: torch.optim.AdamW(head.parameters(), lr=key[1], weight_decay=cfg.attentive_weight_decay)
            for key, head in heads.items()}
    B, epochs = cfg.attentive_batch_size, cfg.attentive_epochs
    steps_per_epoch = math.ceil(len(fit_i) / B)
    curves: dict[tuple[int, float], list[float]] = {key: [] for key in heads}
    best: dict[int, dict[str, Any]] = {}
    with tqdm(total=epochs * steps_per_epoch, desc="attentive probe", unit="step", disable=not progress) as bar, \
            GracefulStop("attentive probe") as stop:
        for epoch in range(epochs):
            order = fit_i[np.random.default_rng([seed, epoch]).permutation(len(fit_i))]
            for i, start in enumerate(range(0, len(order), B)):
                if stop.requested:
                    raise Stopped(f"attentive probe stopped by {stop.signal_name} in epoch {epoch + 1} of {epochs}; "
                                  "nothing of it is kept: run the command again to probe")
                batch = order[start:start + B]
                states = trunk.states(train, batch, seed, epoch, start)
                y = torch.from_numpy(y_all[batch]).to(dev)
                factor = _lr_factor(epoch * steps_per_epoch + i, epochs * steps_per_epoch)
                for (layer, lr), head in heads.items():
                    opt = opts[layer, lr]
                    for group in opt.param_groups:
                        group["lr"] = lr * factor
                    F.cross_entropy(head(states[layer]), y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                bar.update(1)
            for key, acc in _accuracies(trunk, heads, train, val_i, B, seed).items():
                curves[key].append(acc)
                layer, lr = key
                if acc > best.get(layer, {"val_acc": -1.0})["val_acc"]:  # ties: the earlier epoch, the larger lr
                    best[layer] = {"val_acc": acc, "lr": lr, "epoch": epoch + 1, "head": copy.deepcopy(heads[key])}
            bar.set_postfix(val_acc=f"{max(r['val_acc'] for r in best.values()):.3f}")
    chosen = {(layer, r["lr"]): r.pop("head") for layer, r in best.items()}
    tests = _accuracies(trunk, chosen, test, np.arange(len(test)), B, seed)
    return {layer: {"val_acc": r["val_acc"], "test_acc": tests[layer, r["lr"]], "lr": r["lr"], "epoch": r["epoch"],
                    "val_curves": {str(lr): curves[layer, lr] for lr in cfg.lrs}}
            for layer, r in sorted(best.items())}


def attentive_checkpoint(checkpoint: str | Path, data: str, out_dir: str | Path, cfg: AttentiveConfig,
                         probe_cfg: ProbeConfig = ProbeConfig(), feat_cfg: FeatureConfig = FeatureConfig(), *,
                         resize: str = "center", any_palette: bool = False,
                         progress: bool = True) -> dict[str, Any]:
    """``igpt probe --attentive``: the attentive probe of ``checkpoint`` on the layers ``cfg`` names ('best':
    the linear probe's, read from ``out_dir/metrics.json``), on the whole train split and the test split of
    ``data``, read as the linear probe read them (device, dtype, BERT masking from ``feat_cfg``; validation
    carve from ``probe_cfg``). Adds ``"probes": {"attentive": {"layers": {layer: result}, ...}}`` and "attentive_config" to
    ``out_dir/metrics.json`` and returns the updated metrics."""
    path = Path(out_dir) / "metrics.json"
    metrics = read_json(path) if path.is_file() else {}
    _, (model, tokenizer, record) = load_located(checkpoint)
    layers = cfg.layers(model.config.n_layer, metrics.get("best_layer"))
    side = tokenizer.pixel_side(model.config.n_px)  # the image side its tokenizer reads
    images = {split: open_labelled(data, split, n_px=side, tokenizer=tokenizer, resize=resize, any_palette=any_palette)
              for split in ("train_all", "test")}
    mask_prob = None
    if not model.causal and feat_cfg.bert_mask:
        mask_prob = record.reading.mask_prob if feat_cfg.mask_prob == -1 else feat_cfg.mask_prob
    results = attentive_probe(model, tokenizer, images["train_all"], images["test"], layers, cfg,
                              val_fraction=probe_cfg.val_fraction, seed=probe_cfg.seed, device=feat_cfg.device,
                              dtype=feat_cfg.dtype, mask_prob=mask_prob, progress=progress)
    layer_results = {str(layer): r for layer, r in results.items()}
    best = max(layer_results, key=lambda k: layer_results[k]["val_acc"])  # chosen on validation, as the linear one
    metrics.setdefault("probes", {})[ATTENTIVE] = {
        "layers": layer_results, "best_layer": int(best), "best_val_acc": layer_results[best]["val_acc"],
        "best_test_acc": layer_results[best]["test_acc"], "concat": None}
    metrics["attentive_config"] = dataclasses.asdict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, metrics)
    if "subset" in metrics:  # a linear probe ran here first: draw both in its probe.png
        write_probe_png(metrics, path.parent)
    return metrics


def format_attentive(metrics: dict[str, Any]) -> str:
    """The attentive probe's rows beside the linear probe's for the same layers: test and validation
    accuracy of each, and the attentive head's chosen learning rate and epoch."""
    linear = {str(k): v for k, v in metrics.get("probes", {}).get("linear", {}).get("layers", {}).items()}
    lines = [f"{'layer':>5}{'linear acc':>12}{'linear val':>12}{'attentive acc':>15}{'attentive val':>15}"
             f"{'lr':>9}{'epoch':>7}"]
    for layer, r in metrics["probes"][ATTENTIVE]["layers"].items():
        lin = linear.get(str(layer))
        lin_acc = f"{lin['test_acc']:.4f}" if lin else "-"
        lin_val = f"{lin['val_acc']:.4f}" if lin and lin.get("val_acc") is not None else "-"
        lines.append(f"{layer:>5}{lin_acc:>12}{lin_val:>12}{r['test_acc']:>15.4f}{r['val_acc']:>15.4f}"
                     f"{r['lr']:>9.0e}{r['epoch']:>7}")
    return "\n".join(lines)
