"""Pretraining (paper section 3.4): Adam(0.9, 0.95), warm-up then cosine decay to 0, no dropout or weight
decay by default, resumable from the last checkpoint with an identical loss curve.

Run layout (``--out RUN_DIR``)::

    run.json        the model, train and data configs of the run (``--resume`` reads them)
    palette.npz     the palette the run quantizes with
    metrics.jsonl   one JSON object per logged step: {"step", "split", "loss" (nats/token), "bits", ...}
    checkpoints/step-NNNNNNN/   see igpt.checkpoint
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt import checkpoint as ckpt
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.data import ImageSet, check_palette, open_split
from igpt.augment import FolderImages
from igpt.loader import BatchStream, FolderStream, fixed_batches, folder_splits
from igpt.model import GPT
from igpt.objectives import ar_loss, bert_loss, nats_to_bits, objective_loss, sample_keep_mask
from igpt.palette import Palette
from igpt.runtime import autocast, derived_generator, resolve_device, resolve_dtype, seed_everything

log = logging.getLogger(__name__)
RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"
PALETTE_FIT_IMAGES = 2000  # centre crops a palette is fitted on when training streams from a folder


def lr_at(step: int, cfg: TrainConfig, warmup: int) -> float:
    """Learning rate for 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine to
    ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: TrainConfig, n_train: int) -> int:
    """Explicit steps, or (-1) one epoch as in the paper, capped at 10% of the run: the paper's runs are
    1M steps long, where one epoch is ~1%; a short run would otherwise never leave warm-up."""
    if cfg.warmup_steps >= 0:
        return cfg.warmup_steps
    epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum))
    return max(1, min(epoch, cfg.max_steps // 10))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam(W); weight decay, when asked for, applies to weight matrices only (not gains or embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "wte" not in n and "wpe" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], objective: str = "ar",
             mask_prob: float = 0.15, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean loss over ``batches`` (weighted by images), in nats and bits per token. BERT masks are drawn
    from fixed seeds so that repeated evaluations of one model agree."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, ids in enumerate(batches):
        with autocast(ids.device, dtype):
            if objective == "ar":
                loss = ar_loss(model, ids)
            else:
                keep = sample_keep_mask(tuple(ids.shape), mask_prob, derived_generator(seed, 1 << 30, i), ids.device)
                loss = bert_loss(model, ids, keep=keep)
        total, count = total + loss.item() * len(ids), count + len(ids)
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: no batches")
    return {"loss": total / count, "bits": nats_to_bits(total / count), "images": count}


def resolve_palette(data_cfg: DataConfig, train: ImageSet, seed: int, device: torch.device) -> Palette:
    """The given palette file (checked against the data), or a palette fitted on the training pixels."""
    if data_cfg.palette is not None:
        palette = Palette.load(data_cfg.palette)
        check_palette(train, palette)
        return palette
    if train.pixels is None:
        hint = ("OpenAI's kmeans_centers.npy" if train.palette_fingerprint is None
                else f"the palette {train.palette_fingerprint} it was prepared with")
        raise ValueError(f"{train.source} holds palette ids, not pixels: pass --palette with {hint}")
    log.info("fitting a %d-colour palette on %d training images", data_cfg.palette_k, len(train))
    return Palette.fit(train.pixels, k=data_cfg.palette_k, seed=seed, device=device)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file holds one consistent curve."""
    path = run_dir / METRICS_FILE
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged train and val records: what a resumed, already finished run reports."""
    last: dict[str, Any] = {}
    path = run_dir / METRICS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        last[record.pop("split")] = {k: v for k, v in record.items() if k != "step"}
    return last


def _read_run(run_dir: Path) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    path = run_dir / RUN_FILE
    if not path.exists():
        raise ValueError(f"--resume {run_dir}: no {RUN_FILE} there, so it is not an igpt run directory")
    run = json.loads(path.read_text())
    return ModelConfig.from_dict(run["model"]), TrainConfig.from_dict(run["train"]), DataConfig(**run["data"])


class Trainer:
    """State of one pretraining run; ``pretrain`` is the entry point."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path,
                 resume: bool) -> None:
        self.cfg, self.data_cfg, self.run_dir = cfg, data_cfg, run_dir
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        seed_everything(cfg.seed)
        self.train_set, n_train, self.val_set, make_stream = self._open_data(model_cfg.n_px)
        if resume and (run_dir / "palette.npz").exists():
            self.palette = Palette.load(run_dir / "palette.npz")
            check_palette(self.train_set, self.palette)
        else:
            self.palette = resolve_palette(data_cfg, self.train_set, cfg.seed, self.device)
            self.palette.save(run_dir / "palette.npz")
        self.model_cfg = replace(model_cfg, n_vocab=self.palette.k)
        self.model = GPT(self.model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.stream = make_stream(self.palette)
        self.warmup = warmup_steps(cfg, n_train)
        self.step = 0
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    def _open_data(self, n_px: int) -> tuple[ImageSet, int, ImageSet | None, Callable[[Palette], Any]]:
        """(images to fit/check the palette on, number of training images, validation set or None, a
        function palette -> batch stream)."""
        cfg, dc = self.cfg, self.data_cfg
        if cfg.augment == "imagenet":
            images, train_idx, val = folder_splits(dc.data, n_px, dc.val_fraction, cfg.seed)
            fit_idx = np.random.default_rng(cfg.seed).permutation(train_idx)[:PALETTE_FIT_IMAGES]
            view = FolderImages(images.root, n_px, augment="center")
            fit_set = ImageSet(n_px, np.stack([view[int(i)][0].numpy() for i in fit_idx]), None, None, None,
                               None, dc.data)
            return fit_set, len(train_idx), val if cfg.eval_every else None, lambda palette: FolderStream(
                images, train_idx, cfg.batch_size, cfg.seed, palette, self.device, cfg.workers)
        kw = dict(n_px=n_px, val_fraction=dc.val_fraction, seed=cfg.seed, resize=dc.resize)
        train = open_split(dc.data, "train", **kw)
        return train, len(train), self._open_val(kw), lambda palette: BatchStream(
            train, cfg.batch_size, cfg.seed, palette, self.device, cfg.augment)

    def _open_val(self, kw: dict[str, Any]) -> ImageSet | None:
        if self.cfg.eval_every == 0:
            return None
        try:
            return open_split(self.data_cfg.data, "val", **kw)
        except ValueError as e:
            log.warning("no validation split, so no validation loss: %s", e)
            return None

    def restore(self) -> None:
        ckpt_dir = ckpt.resolve_checkpoint(self.run_dir)
        model, _, _ = ckpt.load_checkpoint(ckpt_dir, self.device)
        self.model.load_state_dict(model.state_dict())
        state = ckpt.load_train_state(ckpt_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])
        _truncate_metrics(self.run_dir, self.step)
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def save(self) -> None:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "stream": self.stream.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        info = {"step": self.step, "objective": self.cfg.objective, "n_px": self.model_cfg.n_px,
                "data": self.data_cfg.data}
        ckpt.save_checkpoint(self.run_dir / "checkpoints" / f"step-{self.step:07d}", self.model, self.palette,
                             info, state)
        ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_last)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            ids = self.stream.next()
            generator = derived_generator(cfg.seed, self.step, micro)  # BERT masks, identical after resume
            with autocast(self.device, self.dtype):
                loss = objective_loss(cfg.objective, self.forward, ids, cfg.mask_prob, generator)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {self.step}; resume from the last "
                                     f"checkpoint with a lower --lr")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total, "bits": nats_to_bits(total), "lr": lr, "grad_norm": float(norm)}

    def validate(self) -> dict[str, float]:
        batches = fixed_batches(self.val_set, self.cfg.batch_size, self.cfg.eval_batches, self.palette, self.device)
        return evaluate(self.forward, batches, self.cfg.objective, self.cfg.mask_prob, self.cfg.seed, self.dtype)


def pretrain(model_cfg: ModelConfig | None, cfg: TrainConfig | None, data_cfg: DataConfig | None,
             out_dir: str | Path, *, resume: bool = False, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Pretrain a model into ``out_dir``; with ``resume=True`` the configs come from the run directory and
    training continues from its newest checkpoint. Returns the last train and validation metrics."""
    run_dir = Path(out_dir)
    if resume:
        model_cfg, cfg, data_cfg = _read_run(run_dir)
    else:
        if ckpt.step_checkpoints(run_dir):
            raise ValueError(f"--out {run_dir} already holds a run: continue it with --resume {run_dir}, "
                             f"or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        # Written before anything slow, so a run killed at any point can be resumed.
        ckpt.write_json_atomic(run_dir / RUN_FILE, {"model": model_cfg.to_dict(), "train": cfg.to_dict(),
                                                   "data": data_cfg.to_dict()})
    trainer = Trainer(model_cfg, cfg, data_cfg, run_dir, resume)
    if resume and ckpt.step_checkpoints(run_dir):
        trainer.restore()
    elif resume:
        _truncate_metrics(run_dir, 0)  # killed before its first checkpoint: start over
    run = {"model": trainer.model_cfg.to_dict(), "train": cfg.to_dict(), "data": data_cfg.to_dict()}
    ckpt.write_json_atomic(run_dir / RUN_FILE, run)
    log.info("%s: %s parameters, %d training images, warm-up %d steps, device %s", run_dir,
             f"{trainer.model.num_params():,}", len(trainer.train_set), trainer.warmup, trainer.device)
    return _loop(trainer, progress, on_step)


def _loop(t: Trainer, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None) -> dict[str, Any]:
    cfg, images_per_step = t.cfg, t.cfg.batch_size * t.cfg.grad_accum
    result: dict[str, Any] = _last_metrics(t.run_dir)
    bar = tqdm(total=cfg.max_steps, initial=t.step, disable=not progress, desc="pretrain", unit="step")
    t.model.train()
    tick = time.perf_counter()
    while t.step < cfg.max_steps:
        metrics = t.train_step()
        now = time.perf_counter()
        metrics["img_per_s"] = images_per_step / (now - tick)
        tick = now
        result["train"] = metrics
        if t.step % cfg.log_every == 0 or t.step == cfg.max_steps:
            _append_metrics(t.run_dir, {"step": t.step, "split": "train", **metrics})
        if t.val_set is not None and (t.step % cfg.eval_every == 0 or t.step == cfg.max_steps):
            result["val"] = t.validate()
            _append_metrics(t.run_dir, {"step": t.step, "split": "val", **result["val"]})
            tick = time.perf_counter()
        if t.step % cfg.ckpt_every == 0 or t.step == cfg.max_steps:
            t.save()
            tick = time.perf_counter()
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
        if on_step is not None:
            on_step(t.step, metrics)
    bar.close()
    result["checkpoint"] = str(ckpt.resolve_checkpoint(t.run_dir))
    return result
