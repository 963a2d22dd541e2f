"""Fine-tuning (paper section 2.4): the whole model plus a linear head on the mean-pooled final-norm output.

- Head: ``clf_logits = mean_T(ln_f(h^L)) @ W^T``, W [n_classes, d] zero-initialised and bias-free, as
  image-gpt's ``wclf``. ``--head-layer l`` puts it on a middle layer instead, on the probe's features of that
  layer, ``mean_T(ln_1(h^l))`` (paper section 4.5: it trains faster; the final layer wins eventually); the
  checkpoint records the layer (``Finetuned.head_layer``), so every reader of the head reads that layer.
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
- Resumable: ``OUT/last`` holds the model, head and training state after every evaluation (and on SIGTERM or
  Ctrl-C, which finish the step, save and stop); ``resume_finetune(OUT)`` (``igpt finetune --resume OUT``)
  continues from it exactly. One process writes OUT at a time (``igpt.lock``).

Output layout (``--out OUT``)::

    finetune.json      what was asked: the base checkpoint, data, resize, the FinetuneConfig, the data's identity
    checkpoints/step-N the best checkpoint so far (model + classifier.safetensors): what ``igpt.load`` reads
    last/              the newest state (model, head, optimizer, data position): what a resume reads
    metrics.jsonl      per evaluation, a "train" record (the mean losses since the last one) and a "val" record
                       (validation loss and accuracy), in pretraining's schema (igpt.train.rundir)
    curves.png         those losses and the validation accuracy against the step, redrawn after each evaluation
    metrics.json       the result, written at the end
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch import nn
from tqdm.auto import tqdm

from igpt.atomic import read_json, remove_dir, remove_leftovers, write_json
from igpt.config import FinetuneConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import identity, open_labelled
from igpt.data.splits import balanced_subset
from igpt.data.streams import LabelledBatchStream, labelled_batches
from igpt.lock import DirLock, claim_new
from igpt.model import GPT
from igpt.objectives import EVAL_MASK_KEY, masked_loss, modal_vote, sample_keep_mask
from igpt.tokenizers import AnyTokenizer
from igpt.record import CheckpointRecord, Finetuned
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype, seed_everything
from igpt.stop import GracefulStop, Stopped
from igpt.train.optim import lr_at, make_optimizer, set_lr
from igpt.train.rundir import MetricsLog, truncate_metrics, write_curves
from igpt.weights import checkpoint as ckpt
from igpt.weights.convert import load_classifier, load_located

log = logging.getLogger(__name__)
SPEC_FILE, LAST = "finetune.json", "last"
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # keyed by parameter name


class Classifier(nn.Module):
    """A GPT and a zero-initialised head on the mean over positions of a layer's normed features: the final
    norm's output by default, or layer ``head_layer`` (0..n_layer, numbered as ``GPT.layer_features``). The GPT
    reads ids as its weights were trained (``gpt.causal``); a BERT trunk's inputs are masked at
    ``mask_prob``."""

    def __init__(self, gpt: GPT, n_classes: int, mask_prob: float = 0.15, head_layer: int | None = None) -> None:
        super().__init__()
        L = gpt.config.n_layer
        self.gpt, self.mask_prob = gpt, mask_prob
        self.head_layer = L if head_layer is None else head_layer
        if not 0 <= self.head_layer <= L:
            raise ValueError(f"--head-layer {head_layer} is outside this checkpoint's layers 0..{L} (-1: the final "
                             "norm)")
        self.head = nn.Linear(gpt.config.n_embd, n_classes, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-norm output (B, T, D), class logits (B, n_classes)) from one forward pass."""
        if self.head_layer == self.gpt.config.n_layer:  # the final norm: one call of it feeds both losses
            z = feats = self.gpt.hidden_states(ids, keep=keep)[-1]  # (B, T, D)
        else:
            z, (feats,) = self.gpt.forward_intermediates(ids, [self.head_layer], keep=keep)  # (B, T, D) each
        return z, self.head(feats.mean(dim=1))

    def keep(self, shape: tuple[int, int], device: torch.device, *keys: int) -> torch.Tensor | None:
        """The input mask of a BERT trunk, drawn from ``keys``; None for an AR trunk."""
        if self.gpt.causal:
            return None
        return sample_keep_mask(shape, self.mask_prob, derived_generator(*keys), device)


def losses(clf: Classifier, ids: torch.Tensor, labels: torch.Tensor, gen_weight: float,
           keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"loss": L_CLF + gen_weight * L_GEN, "clf", "gen"} in nats, and the "clf_logits" (B, n_classes), from
    one forward pass."""
    z, clf_logits = clf(ids, keep)
    clf_loss = F.cross_entropy(clf_logits.float(), labels)
    gen_loss = torch.zeros((), device=ids.device)
    if gen_weight > 0:
        logits = clf.gpt.lm_head(z)  # (B, T, V)
        gen_loss = (F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()) if keep is None
                    else masked_loss(logits, ids, keep))
    return {"loss": clf_loss + gen_weight * gen_loss, "clf": clf_loss, "gen": gen_loss, "clf_logits": clf_logits}


@torch.no_grad()
def evaluate(clf: Classifier, images: ImageSet, tokenizer: AnyTokenizer, cfg: FinetuneConfig, device: torch.device,
             dtype: torch.dtype, with_losses: bool = False, mask: int = 0) -> tuple[np.ndarray, dict[str, float]]:
    """(Predicted class of every image (N,), and with ``with_losses`` the mean of ``losses`` over the images
    in nats), unaugmented; BERT inputs under fixed seeded masks (``mask`` k > 0: the k-th other one)."""
    was_training = clf.training
    clf.eval()
    preds, start, sums = [], 0, {"loss": 0.0, "clf_loss": 0.0, "gen_loss": 0.0}
    for ids, labels in labelled_batches(images, cfg.eval_batch_size, tokenizer, device):
        keys = (cfg.seed, EVAL_MASK_KEY, start) + ((mask,) if mask else ())
        keep = clf.keep(tuple(ids.shape), device, *keys)
        with autocast(device, dtype):
            if with_losses:
                parts = losses(clf, ids, labels, cfg.gen_weight, keep)
                for name, key in (("loss", "loss"), ("clf", "clf_loss"), ("gen", "gen_loss")):
                    sums[key] += parts[name].item() * len(ids)
                preds.append(parts["clf_logits"].argmax(1).cpu().numpy())
            else:
                preds.append(clf(ids, keep)[1].argmax(1).cpu().numpy())
        start += len(ids)
    clf.train(was_training)
    return np.concatenate(preds), ({k: v / start for k, v in sums.items()} if with_losses else {})


def predict(clf: Classifier, images: ImageSet, tokenizer: AnyTokenizer, cfg: FinetuneConfig, device: torch.device,
            dtype: torch.dtype) -> np.ndarray:
    """Predicted class of every image (N,), unaugmented; a BERT trunk's under ``cfg.n_masks`` fixed seeded
    masks, combined by a modal vote with seeded random tie-breaks (the paper's ensemble)."""
    n = 1 if clf.gpt.causal else cfg.n_masks
    preds = np.stack([evaluate(clf, images, tokenizer, cfg, device, dtype, mask=k)[0] for k in range(n)])
    return preds[0] if n == 1 else modal_vote(preds, clf.head.out_features, cfg.seed)


def _accuracy(clf: Classifier, images: ImageSet, tokenizer: AnyTokenizer, cfg: FinetuneConfig, device: torch.device,
              dtype: torch.dtype) -> float:
    return float((predict(clf, images, tokenizer, cfg, device, dtype) == np.asarray(images.labels)).mean())


def _splits(data: str, tokenizer: AnyTokenizer, n_px: int, cfg: FinetuneConfig, resize: str) -> dict[str, ImageSet]:
    kw = {"n_px": tokenizer.pixel_side(n_px), "tokenizer": tokenizer, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
          "resize": resize, "any_palette": cfg.any_palette}
    splits = {split: open_labelled(data, split, **kw) for split in ("train", "val", "test")}
    if cfg.labels_per_class:
        splits["train"] = splits["train"].take(balanced_subset(splits["train"].labels, cfg.labels_per_class,
                                                               cfg.seed))
    return splits


def finetune(checkpoint: str | Path, data: str, out_dir: str | Path, cfg: FinetuneConfig = FinetuneConfig(), *,
             resize: str = "center", progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` (any weights ``igpt.load`` reads) on the labelled ``data`` into ``out_dir`` (a
    new or empty directory); returns (and writes to ``out_dir/metrics.json``) {"val_acc", "best_step",
    "test_acc", "steps", "checkpoint", ...}. SIGTERM or Ctrl-C saves ``out_dir/last`` and raises
    ``igpt.stop.Stopped``; ``resume_finetune`` continues."""
    out = Path(out_dir)
    with claim_new(out, marker=SPEC_FILE, what="a fine-tune") as lock:
        try:
            job = _Job.new(checkpoint, data, out, cfg, resize)
        except BaseException:
            lock.discard()  # a bad input leaves no half-made output behind
            raise
        return job.run(progress)


def resume_finetune(out_dir: str | Path, *, changes: dict[str, Any] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Continue the fine-tune in ``out_dir`` from ``out_dir/last``, as if it had never stopped; ``changes``
    may move it to another device (``FINETUNE_RESUME_CHANGES``)."""
    out = Path(out_dir)
    spec = read_json(out / SPEC_FILE) if (out / SPEC_FILE).is_file() else None
    if spec is None:
        raise ValueError(f"--resume {out}: no {SPEC_FILE} there, so it is not an igpt fine-tune")
    spec["config"].update(changes or {})
    with DirLock(out, "--resume"):
        remove_leftovers(out)
        if not ckpt.is_checkpoint(out / LAST):
            if (out / "metrics.json").is_file():
                raise ValueError(f"--resume {out}: this fine-tune has finished (see {out / 'metrics.json'})")
            raise ValueError(f"--resume {out}: no saved state ({out / LAST}) yet; start it again with --out")
        return _Job.restore(out, spec).run(progress)


class _Job:
    """One fine-tune: what it trains, on what, and where it is."""

    def __init__(self, out: Path, spec: dict[str, Any], clf: Classifier, tokenizer: AnyTokenizer,
                 splits: dict[str, ImageSet], record: CheckpointRecord, cfg: FinetuneConfig) -> None:
        self.out, self.spec, self.clf, self.tokenizer, self.splits, self.record, self.cfg = (
            out, spec, clf, tokenizer, splits, record, cfg)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.opt = make_optimizer(clf, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0, device=self.device)
        self.stream = LabelledBatchStream(splits["train"], cfg.batch_size, cfg.seed, tokenizer, self.device,
                                          cfg.augment)
        self.step, self.stale = 0, 0
        # sums of the training losses since the last evaluation, for its "train" record (kept in the resume state)
        self.window: dict[str, float] = {"loss": 0.0, "clf_loss": 0.0, "gen_loss": 0.0, "n": 0}
        self.best: dict[str, Any] = {"val_acc": -1.0, "best_step": 0, "stopped_early": False}

    @classmethod
    def new(cls, checkpoint: str | Path, data: str, out: Path, cfg: FinetuneConfig, resize: str) -> "_Job":
        device = resolve_device(cfg.device)
        base_dir, (model, tokenizer, base) = load_located(checkpoint, device)
        mask_prob = base.reading.mask_prob if cfg.mask_prob == -1 else cfg.mask_prob
        splits = _splits(data, tokenizer, model.config.n_px, cfg, resize)
        labels = np.concatenate([np.asarray(s.labels) for s in splits.values()])
        classes = splits["train"].classes
        n_classes = max(int(labels.max()) + 1, len(classes or []))
        seed_everything(cfg.seed)
        head_layer = None if cfg.head_layer == -1 else cfg.head_layer
        clf = Classifier(model, n_classes, mask_prob, head_layer).to(device).train()
        record = CheckpointRecord(model.config, tokenizer.fingerprint(), base.objective, mask_prob if not model.causal
                                  else None, data=str(data),
                                  finetuned=Finetuned(n_classes, tuple(classes) if classes else None,
                                                      base_checkpoint=str(base_dir), head_layer=clf.head_layer))
        spec = {"checkpoint": str(base_dir), "data": str(data), "resize": resize, "config": dataclasses.asdict(cfg),
                "data_identity": identity(data)}
        write_json(out / SPEC_FILE, spec)
        return cls(out, spec, clf, tokenizer, splits, record, cfg)

    @classmethod
    def restore(cls, out: Path, spec: dict[str, Any]) -> "_Job":
        cfg = FinetuneConfig(**spec["config"])
        found = identity(spec["data"])
        if found != spec["data_identity"]:
            raise ValueError(f"--resume {out}: the data {spec['data']} has changed since the fine-tune started "
                             f"(recorded {spec['data_identity']}, found {found}); resume with the same data")
        device = resolve_device(cfg.device)
        model, head, tokenizer, record = load_classifier(out / LAST, device)
        splits = _splits(spec["data"], tokenizer, model.config.n_px, cfg, spec["resize"])
        mask_prob = record.mask_prob if record.mask_prob is not None else cfg.mask_prob
        clf = Classifier(model, record.finetuned.n_classes, mask_prob, record.head_layer).to(device).train()
        clf.head.load_state_dict(head.state_dict())
        job = cls(out, spec, clf, tokenizer, splits, record, cfg)
        state = ckpt.load_train_state(out / LAST)
        set_optimizer_state_dict(clf, job.opt, state["optimizer"], options=FULL_STATE)
        job.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        job.step, job.stale = int(state["step"]), int(state["stale"])
        job.window.update({k: float(v) for k, v in state.get("window", {}).items() if k in job.window})
        job.best = {"val_acc": float(state["best"]["val_acc"]), "best_step": int(state["best"]["best_step"]),
                    "stopped_early": bool(state["best"]["stopped_early"])}
        truncate_metrics(out, job.step)
        log.info("resumed %s at step %d (best validation accuracy %.4f at step %d)", out, job.step,
                 job.best["val_acc"], job.best["best_step"])
        return job

    def save_last(self) -> None:
        """The state a resume continues from, replaced whole (``igpt.atomic``)."""
        state = {"step": self.step, "stale": self.stale, "best": dict(self.best), "window": dict(self.window),
                 "optimizer": get_optimizer_state_dict(self.clf, self.opt, options=FULL_STATE),
                 "stream": self.stream.state_dict(), "torch_rng": torch.get_rng_state()}
        ckpt.save_checkpoint(self.out / LAST, self.clf.gpt, self.tokenizer, self.record.replace(step=self.step),
                             train_state=state, classifier={"head.weight": self.clf.head.weight})

    def run(self, progress: bool) -> dict[str, Any]:
        cfg, device, dtype = self.cfg, self.device, self.dtype
        with GracefulStop("finetune") as stop:
            best = _train(self, stop, progress)
        tuned, head, _, saved = load_classifier(self.out, device)  # the best checkpoint, as a user would load it
        best_clf = Classifier(tuned, self.clf.head.out_features, self.clf.mask_prob, saved.head_layer).to(device)
        best_clf.head.load_state_dict(head.state_dict())
        metrics = {**best, "test_acc": _accuracy(best_clf, self.splits["test"], self.tokenizer, cfg, device, dtype),
                   "checkpoint": str(ckpt.resolve_checkpoint(self.out)), "data": self.spec["data"],
                   "n_train": len(self.splits["train"]), "base_checkpoint": self.spec["checkpoint"],
                   "config": dataclasses.asdict(cfg)}
        write_json(self.out / "metrics.json", metrics)
        remove_dir(self.out / LAST)  # finished: the best checkpoint is what remains to be read
        return metrics


def _log_evaluation(job: _Job, metrics_log: MetricsLog, lr: float) -> float:
    """Validation loss and accuracy now, logged with the mean training losses since the last evaluation;
    returns the accuracy."""
    val = job.splits["val"]
    preds, val_losses = evaluate(job.clf, val, job.tokenizer, job.cfg, job.device, job.dtype, with_losses=True)
    acc = float((preds == np.asarray(val.labels)).mean())
    n = max(1, job.window["n"])
    metrics_log.write({"split": "train", "step": job.step, "loss": job.window["loss"] / n,
                       "clf_loss": job.window["clf_loss"] / n, "gen_loss": job.window["gen_loss"] / n, "lr": lr})
    metrics_log.write({"split": "val", "step": job.step, **val_losses, "acc": acc, "images": len(val)})
    job.window = dict.fromkeys(job.window, 0.0) | {"n": 0}
    return acc


def _train(job: _Job, stop: GracefulStop, progress: bool) -> dict[str, Any]:
    """The loop: warm-up then constant LR, evaluations, saving each new best and the state to resume from,
    early stopping, and a clean stop on a signal."""
    clf, opt, stream, cfg, device, dtype = job.clf, job.opt, job.stream, job.cfg, job.device, job.dtype
    tokenizer, out, best = job.tokenizer, job.out, job.best
    metrics_log = MetricsLog(out)
    bar = tqdm(total=cfg.max_steps, initial=job.step, desc="finetune", unit="step", disable=not progress)
    try:
        while job.step < cfg.max_steps and not best["stopped_early"]:
            lr = lr_at(job.step, lr=cfg.lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps, decay="constant")
            set_lr(opt, lr)
            ids, labels = stream.next()
            keep = clf.keep(tuple(ids.shape), device, cfg.seed, job.step)
            with autocast(device, dtype):
                parts = losses(clf, ids, labels, cfg.gen_weight, keep)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            job.step += 1
            for name, key in (("loss", "loss"), ("clf", "clf_loss"), ("gen", "gen_loss")):
                job.window[key] += parts[name].item()
            job.window["n"] += 1
            bar.update(1)
            evaluate_now = job.step % cfg.eval_every == 0 or job.step == cfg.max_steps
            if evaluate_now:
                acc = _log_evaluation(job, metrics_log, lr)
                write_curves(out, f"fine-tuning · {out.name}", "loss (nats): L_CLF + w L_GEN")
                bar.set_postfix(loss=f"{parts['loss'].item():.3f}", val_acc=f"{acc:.3f}")
                if acc > best["val_acc"]:
                    best.update(val_acc=acc, best_step=job.step)
                    job.stale = 0
                    tuned = job.record.replace(step=job.step,
                                               finetuned=dataclasses.replace(job.record.finetuned, val_acc=acc))
                    ckpt.save_checkpoint(out / "checkpoints" / f"step-{job.step:07d}", clf.gpt, tokenizer, tuned,
                                         classifier={"head.weight": clf.head.weight})
                    ckpt.prune_checkpoints(out, keep_last=1)
                else:
                    job.stale += 1
                    best["stopped_early"] = job.stale >= cfg.patience
            if stop.requested and job.step < cfg.max_steps and not best["stopped_early"]:
                job.save_last()
                raise Stopped(f"stopped by {stop.signal_name} at step {job.step} of {cfg.max_steps}; state in "
                              f"{out / LAST}; continue with: igpt finetune --resume {out}")
            if evaluate_now:
                job.save_last()
    finally:
        bar.close()
        metrics_log.close()
    return {**best, "steps": job.step}
