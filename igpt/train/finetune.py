"""Fine-tuning (paper section 2.4): the whole model plus a linear head on the mean-pooled final-norm output.

- Head: ``clf_logits = mean_T(ln_f(h^L)) @ W^T``, W [n_classes, d] zero-initialised and bias-free, as
  image-gpt's ``wclf``.
- Loss: ``L_CLF + gen_weight * L_GEN``; L_GEN is the checkpoint's own pretraining loss (AR next-pixel, or
  BERT on masked positions) computed from the same forward pass. The paper found L_GEN + L_CLF (weight 1)
  better than L_CLF alone; ``gen_weight=0`` trains on L_CLF only.
- The trunk is read as its record says: BERT checkpoints read their inputs masked (at the rate they were
  pretrained with, unless ``--mask-prob`` says otherwise) in training and evaluation, as they were
  pretrained (fixed, seeded masks for evaluation, so repeated evaluations agree).
- Augmentation: CIFAR's reflect-pad 4, random crop, random flip (``igpt.data.augment.cifar_augment``) on pixels
  before quantization, or exactly on the id grid of an ids cache.
- Optimiser: Adam(0.9, 0.95) without weight decay, linear warm-up then a constant learning rate (no cosine);
  validation accuracy every ``eval_every`` steps, early stop after ``patience`` evaluations without a better
  one. Each new best is saved as ``OUT/checkpoints/step-N`` (model + ``classifier.safetensors``), which
  ``igpt.load`` (the model) and ``igpt.weights.load_classifier`` (model and head) read; the test accuracy
  is that of the best checkpoint, reloaded from disk. The schedule and the metrics log are pretraining's
  (``igpt.train.optim``, ``igpt.train.rundir.MetricsLog``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from igpt.atomic import write_json
from igpt.config import FinetuneConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import open_labelled
from igpt.data.splits import balanced_subset
from igpt.data.streams import LabelledBatchStream, labelled_batches
from igpt.model import GPT
from igpt.objectives import EVAL_MASK_KEY, masked_loss, sample_keep_mask
from igpt.palette import Palette
from igpt.record import CheckpointRecord, Finetuned
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype, seed_everything
from igpt.train.optim import lr_at, make_optimizer, set_lr
from igpt.train.rundir import MetricsLog
from igpt.weights import checkpoint as ckpt
from igpt.weights.convert import load_classifier, load_located

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """A GPT and a zero-initialised head on the mean over positions of its final norm's output. The GPT
    reads ids as its weights were trained (``gpt.causal``); a BERT trunk's inputs are masked at
    ``mask_prob``."""

    def __init__(self, gpt: GPT, n_classes: int, mask_prob: float = 0.15) -> None:
        super().__init__()
        self.gpt, self.mask_prob = gpt, mask_prob
        self.head = nn.Linear(gpt.config.n_embd, n_classes, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-norm output (B, T, D), class logits (B, n_classes))."""
        z = self.gpt.hidden_states(ids, keep=keep)[-1]  # (B, T, D)
        return z, self.head(z.mean(dim=1))

    def keep(self, shape: tuple[int, int], device: torch.device, *keys: int) -> torch.Tensor | None:
        """The input mask of a BERT trunk, drawn from ``keys``; None for an AR trunk."""
        if self.gpt.causal:
            return None
        return sample_keep_mask(shape, self.mask_prob, derived_generator(*keys), device)


def losses(clf: Classifier, ids: torch.Tensor, labels: torch.Tensor, gen_weight: float,
           keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"loss": L_CLF + gen_weight * L_GEN, "clf", "gen"} in nats, from one forward pass."""
    z, clf_logits = clf(ids, keep)
    clf_loss = F.cross_entropy(clf_logits.float(), labels)
    gen_loss = torch.zeros((), device=ids.device)
    if gen_weight > 0:
        logits = clf.gpt.lm_head(z)  # (B, T, V)
        gen_loss = (F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()) if keep is None
                    else masked_loss(logits, ids, keep))
    return {"loss": clf_loss + gen_weight * gen_loss, "clf": clf_loss, "gen": gen_loss}


@torch.no_grad()
def predict(clf: Classifier, images: ImageSet, palette: Palette, cfg: FinetuneConfig, device: torch.device,
            dtype: torch.dtype) -> np.ndarray:
    """Predicted class of every image (N,), unaugmented; BERT inputs under fixed seeded masks."""
    was_training = clf.training
    clf.eval()
    preds, start = [], 0
    for ids, _ in labelled_batches(images, cfg.eval_batch_size, palette, device):
        keep = clf.keep(tuple(ids.shape), device, cfg.seed, EVAL_MASK_KEY, start)
        with autocast(device, dtype):
            preds.append(clf(ids, keep)[1].argmax(1).cpu().numpy())
        start += len(ids)
    clf.train(was_training)
    return np.concatenate(preds)


def _accuracy(clf: Classifier, images: ImageSet, palette: Palette, cfg: FinetuneConfig, device: torch.device,
              dtype: torch.dtype) -> float:
    return float((predict(clf, images, palette, cfg, device, dtype) == np.asarray(images.labels)).mean())


def _splits(data: str, palette: Palette, n_px: int, cfg: FinetuneConfig, resize: str) -> dict[str, ImageSet]:
    kw = {"n_px": n_px, "palette": palette, "val_fraction": cfg.val_fraction, "seed": cfg.seed, "resize": resize}
    splits = {split: open_labelled(data, split, **kw) for split in ("train", "val", "test")}
    if cfg.labels_per_class:
        splits["train"] = splits["train"].take(balanced_subset(splits["train"].labels, cfg.labels_per_class,
                                                               cfg.seed))
    return splits


def finetune(checkpoint: str | Path, data: str, out_dir: str | Path, cfg: FinetuneConfig = FinetuneConfig(), *,
             resize: str = "center", progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` (any weights ``igpt.load`` reads) on the labelled ``data`` into ``out_dir``;
    returns (and writes to ``out_dir/metrics.json``) {"val_acc", "best_step", "test_acc", "steps",
    "checkpoint", ...}."""
    out = Path(out_dir)
    if ckpt.step_checkpoints(out):
        raise ValueError(f"--out {out} already holds a fine-tuned checkpoint; choose another --out")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    base_dir, (model, palette, base) = load_located(checkpoint, device)
    mask_prob = base.reading.mask_prob if cfg.mask_prob == -1 else cfg.mask_prob
    splits = _splits(data, palette, model.config.n_px, cfg, resize)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.concatenate([np.asarray(s.labels) for s in splits.values()])
    classes = splits["train"].classes
    n_classes = max(int(labels.max()) + 1, len(classes or []))
    seed_everything(cfg.seed)
    clf = Classifier(model, n_classes, mask_prob).to(device).train()
    opt = make_optimizer(clf, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0, device=device)
    stream = LabelledBatchStream(splits["train"], cfg.batch_size, cfg.seed, palette, device, cfg.augment)
    record = CheckpointRecord(model.config, palette.fingerprint(), base.objective, mask_prob if not model.causal
                              else None, data=str(data),
                              finetuned=Finetuned(n_classes, tuple(classes) if classes else None,
                                                  base_checkpoint=str(base_dir)))
    best = _train(clf, opt, stream, splits["val"], palette, cfg, device, dtype, out, record, progress)

    tuned, head, _, _ = load_classifier(out, device)  # the best checkpoint, as a user would load it
    best_clf = Classifier(tuned, n_classes, mask_prob).to(device)
    best_clf.head.load_state_dict(head.state_dict())
    metrics = {**best, "test_acc": _accuracy(best_clf, splits["test"], palette, cfg, device, dtype),
               "checkpoint": str(ckpt.resolve_checkpoint(out)), "data": str(data), "n_train": len(splits["train"]),
               "base_checkpoint": str(base_dir), "config": dataclasses.asdict(cfg)}
    write_json(out / "metrics.json", metrics)
    return metrics


def _train(clf: Classifier, opt: torch.optim.Optimizer, stream: LabelledBatchStream, val: ImageSet,
           palette: Palette, cfg: FinetuneConfig, device: torch.device, dtype: torch.dtype, out: Path,
           record: CheckpointRecord, progress: bool) -> dict[str, Any]:
    """The loop: warm-up then constant LR, evaluations, saving each new best, early stopping."""
    (out / "metrics.jsonl").unlink(missing_ok=True)
    metrics_log = MetricsLog(out)
    best = {"val_acc": -1.0, "best_step": 0, "stopped_early": False}
    stale, step = 0, 0
    bar = tqdm(total=cfg.max_steps, desc="finetune", unit="step", disable=not progress)
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps, decay="constant")
            set_lr(opt, lr)
            ids, labels = stream.next()
            keep = clf.keep(tuple(ids.shape), device, cfg.seed, step)
            with autocast(device, dtype):
                parts = losses(clf, ids, labels, cfg.gen_weight, keep)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            acc = _accuracy(clf, val, palette, cfg, device, dtype)
            metrics_log.write({"step": step, "split": "val", "lr": lr, "val_acc": acc,
                               **{k: v.item() for k, v in parts.items()}})
            bar.set_postfix(loss=f"{parts['loss'].item():.3f}", val_acc=f"{acc:.3f}")
            if acc > best["val_acc"]:
                best.update(val_acc=acc, best_step=step)
                stale = 0
                tuned = record.replace(step=step, finetuned=dataclasses.replace(record.finetuned, val_acc=acc))
                ckpt.save_checkpoint(out / "checkpoints" / f"step-{step:07d}", clf.gpt, palette, tuned,
                                     classifier={"head.weight": clf.head.weight})
                ckpt.prune_checkpoints(out, keep_last=1)
            else:
                stale += 1
                if stale >= cfg.patience:
                    best["stopped_early"] = True
                    break
    finally:
        bar.close()
        metrics_log.close()
    return {**best, "steps": step}
