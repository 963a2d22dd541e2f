"""Fine-tuning (paper section 2.4): the whole model plus a linear head on the mean-pooled final-norm output.

- Head: ``clf_logits = mean_T(ln_f(h^L)) @ W^T``, W [n_classes, d] zero-initialised and bias-free, as
  image-gpt's ``wclf``.
- Loss: ``L_CLF + gen_weight * L_GEN``; L_GEN is the checkpoint's own pretraining loss (AR next-pixel, or
  BERT on masked positions) computed from the same forward pass. The paper found L_GEN + L_CLF (weight 1)
  better than L_CLF alone; ``gen_weight=0`` trains on L_CLF only.
- BERT checkpoints read their inputs masked (p = ``mask_prob``) in training and evaluation, as they were
  pretrained (fixed, seeded masks for evaluation, so repeated evaluations agree).
- Augmentation: CIFAR's reflect-pad 4, random crop, random flip (``igpt.data.augment.cifar_augment``) on pixels
  before quantization, or exactly on the id grid of an ids cache.
- Optimiser: Adam(0.9, 0.95) without weight decay, linear warm-up then a constant learning rate (no cosine);
  validation accuracy every ``eval_every`` steps, early stop after ``patience`` evaluations without a better
  one. Each new best is saved as ``OUT/checkpoints/step-N`` (model + ``classifier.safetensors``), which
  ``igpt.load`` (the model) and ``igpt.weights.checkpoint.load_classifier`` (model and head) read; the test accuracy
  is that of the best checkpoint, reloaded from disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from igpt.weights import checkpoint as ckpt
from igpt.config import arg, require_at_least
from igpt.data.cache import ImageSet
from igpt.eval.features import base_objective, open_labelled, take
from igpt.data.streams import LabelledBatchStream, labelled_batches
from igpt.model import GPT
from igpt.objectives import masked_loss, sample_keep_mask
from igpt.palette import Palette
from igpt.eval.probe import balanced_subset
from igpt.runtime import (
    autocast,
    derived_generator,
    resolve_device,
    resolve_dtype,
    seed_everything,
)

log = logging.getLogger(__name__)
EVAL_MASK_KEY = 1 << 30  # derived-generator key of evaluation masks, apart from any training step


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe of ``igpt finetune`` (paper section 3.4's fine-tuning paragraph)."""

    lr: float = arg(3e-4, "learning rate after warm-up, held constant (the paper's were ~10x below pretraining's)")
    warmup_steps: int = arg(100, "linear warm-up steps")
    batch_size: int = arg(64, "labelled images per step")
    max_steps: int = arg(5000, "most optimizer steps (early stopping usually ends sooner)")
    gen_weight: float = arg(1.0, "weight of the generative loss L_GEN in L_CLF + w * L_GEN (0: L_CLF alone)")
    augment: str = arg("cifar", "'cifar' (reflect-pad 4, random crop, flip; the paper's CIFAR recipe) or 'none'",
                       choices=("none", "cifar"))
    eval_every: int = arg(200, "steps between validation-accuracy evaluations")
    patience: int = arg(5, "stop after this many evaluations without a better validation accuracy")
    beta1: float = arg(0.9, "Adam beta1")
    beta2: float = arg(0.95, "Adam beta2")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 disables")
    mask_prob: float = arg(0.15, "BERT checkpoints: probability that an input position is masked")
    val_fraction: float = arg(0.1, "fraction of train carved out (seeded) for validation when the data has no "
                              "val split")
    labels_per_class: int = arg(0, "train on a balanced, seeded subset of this many images per class (0: all)")
    eval_batch_size: int = arg(256, "images per forward pass when evaluating")
    seed: int = arg(0, "seed for the head, batch order, augmentation, masks and subsets")
    device: str = arg("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = arg("auto", "autocast dtype: 'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'",
                     choices=("auto", "bf16", "fp32"))

    def __post_init__(self) -> None:
        require_at_least(self, ("batch_size", "max_steps", "eval_every", "patience", "eval_batch_size"), 1)
        require_at_least(self, ("warmup_steps", "labels_per_class", "gen_weight", "grad_clip"), 0)
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("--val-fraction must be in (0, 1): early stopping needs validation images")
        if self.augment not in ("none", "cifar"):
            raise ValueError(f"--augment must be 'none' or 'cifar', got {self.augment!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")


class Classifier(nn.Module):
    """A GPT and a zero-initialised head on the mean over positions of its final norm's output."""

    def __init__(self, gpt: GPT, n_classes: int, objective: str = "ar") -> None:
        super().__init__()
        self.gpt, self.objective = gpt, objective
        self.head = nn.Linear(gpt.config.n_embd, n_classes, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-norm output (B, T, D), class logits (B, n_classes))."""
        z = self.gpt.hidden_states(ids, causal=self.objective == "ar", keep=keep)[-1]  # (B, T, D)
        return z, self.head(z.mean(dim=1))


def _keep(objective: str, shape: tuple[int, int], mask_prob: float, device: torch.device,
          *keys: int) -> torch.Tensor | None:
    return sample_keep_mask(shape, mask_prob, derived_generator(*keys), device) if objective == "bert" else None


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
        keep = _keep(clf.objective, tuple(ids.shape), cfg.mask_prob, device, cfg.seed, EVAL_MASK_KEY, start)
        with autocast(device, dtype):
            preds.append(clf(ids, keep)[1].argmax(1).cpu().numpy())
        start += len(ids)
    clf.train(was_training)
    return np.concatenate(preds)


def _accuracy(clf: Classifier, images: ImageSet, palette: Palette, cfg: FinetuneConfig, device: torch.device,
              dtype: torch.dtype) -> float:
    return float((predict(clf, images, palette, cfg, device, dtype) == np.asarray(images.labels)).mean())


def _open(checkpoint: str | Path, data: str, cfg: FinetuneConfig, device: torch.device, resize: str
          ) -> tuple[GPT, Palette, dict[str, Any], dict[str, ImageSet]]:
    model, palette, config = ckpt.load_checkpoint(checkpoint, device)
    kw = {"n_px": model.config.n_px, "palette": palette, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
          "resize": resize}
    splits = {split: open_labelled(data, split, **kw) for split in ("train", "val", "test")}
    if cfg.labels_per_class:
        splits["train"] = take(splits["train"], balanced_subset(splits["train"].labels, cfg.labels_per_class,
                                                                cfg.seed))
    return model, palette, config, splits


def finetune(checkpoint: str | Path, data: str, out_dir: str | Path, cfg: FinetuneConfig = FinetuneConfig(), *,
             resize: str = "center", progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on the labelled ``data`` into ``out_dir``; returns (and writes to
    ``out_dir/metrics.json``) {"val_acc", "best_step", "test_acc", "steps", "checkpoint", ...}."""
    out = Path(out_dir)
    if ckpt.step_checkpoints(out):
        raise ValueError(f"--out {out} already holds a fine-tuned checkpoint; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, palette, config, splits = _open(checkpoint, data, cfg, device, resize)
    objective = base_objective(config)
    labels = np.concatenate([np.asarray(s.labels) for s in splits.values()])
    classes = splits["train"].classes
    n_classes = max(int(labels.max()) + 1, len(classes or []))
    seed_everything(cfg.seed)
    clf = Classifier(model, n_classes, objective).to(device).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0,
                            fused=device.type == "cuda")
    stream = LabelledBatchStream(splits["train"], cfg.batch_size, cfg.seed, palette, device, cfg.augment)
    info = {"objective": "finetune", "base_objective": objective, "n_classes": n_classes, "classes": classes,
            "n_px": model.config.n_px, "data": str(data), "base_checkpoint": str(ckpt.resolve_checkpoint(checkpoint))}
    best = _train(clf, opt, stream, splits["val"], palette, cfg, device, dtype, out, info, progress)

    tuned, head, _, _ = ckpt.load_classifier(out, device)  # the best checkpoint, as a user would load it
    best_clf = Classifier(tuned, n_classes, objective).to(device)
    best_clf.head.load_state_dict(head.state_dict())
    metrics = {**best, "test_acc": _accuracy(best_clf, splits["test"], palette, cfg, device, dtype),
               "checkpoint": str(ckpt.resolve_checkpoint(out)), "data": str(data), "n_train": len(splits["train"]),
               "base_checkpoint": info["base_checkpoint"], "config": dataclasses.asdict(cfg)}
    ckpt.write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _train(clf: Classifier, opt: torch.optim.Optimizer, stream: LabelledBatchStream, val: ImageSet,
           palette: Palette, cfg: FinetuneConfig, device: torch.device, dtype: torch.dtype, out: Path,
           info: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The loop: warm-up then constant LR, evaluations, saving each new best, early stopping."""
    history = out / "metrics.jsonl"
    history.unlink(missing_ok=True)
    best = {"val_acc": -1.0, "best_step": 0, "stopped_early": False}
    stale, step = 0, 0
    bar = tqdm(total=cfg.max_steps, desc="finetune", unit="step", disable=not progress)
    while step < cfg.max_steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = stream.next()
        keep = _keep(clf.objective, tuple(ids.shape), cfg.mask_prob, device, cfg.seed, step)
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
        record = {"step": step, "lr": lr, "val_acc": acc, **{k: v.item() for k, v in parts.items()}}
        with open(history, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_acc=f"{acc:.3f}")
        if acc > best["val_acc"]:
            best.update(val_acc=acc, best_step=step)
            stale = 0
            ckpt.save_checkpoint(out / "checkpoints" / f"step-{step:07d}", clf.gpt, palette,
                                 {**info, "step": step, "val_acc": acc}, classifier={"head.weight": clf.head.weight})
            ckpt.prune_checkpoints(out, keep_last=1)
        else:
            stale += 1
            if stale >= cfg.patience:
                best["stopped_early"] = True
                break
    bar.close()
    return {**best, "steps": step}
