"""Pretraining (paper section 3.4): Adam(0.9, 0.95), warm-up then cosine decay to 0, no dropout or weight
decay by default, resumable from the last checkpoint with an identical loss curve; data-parallel under
``torchrun`` (see ``igpt.distributed``).

Run layout (``--out RUN_DIR``)::

    run.json        the model, train and data configs of the run (``--resume`` reads them)
    palette.npz     the tokenizer the run's ids come from: a palette, or tokenizer.safetensors for a VQ-VAE
    metrics.jsonl   one JSON object per logged step: {"split", "step", "loss" (nats/token), "bits", ...}
                    (the schema fine-tuning shares: igpt.train.rundir, docs/training.md)
    curves.png      train and validation loss against the step, redrawn when the run ends or stops
    samples/step-NNNNNNN.png   with --sample-every: a grid of 16 samples, the same seed each time
    tensorboard/    with --tensorboard: the metrics and the sample grids
    checkpoints/step-NNNNNNN/   see igpt.weights.checkpoint
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt.atomic import remove_leftovers, write_json
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.data.open import identity
from igpt.distributed import (World, any_across, barrier, init_distributed, is_communication_error, peer_lost,
                              shutdown)
from igpt.lock import DirLock
from igpt.stop import GracefulStop, Stopped
from igpt.train.rundir import (RUN_FILE, MetricsLog, claim_run, last_metrics, read_run, read_run_file,
                               require_tensorboard, run_record, truncate_metrics, write_curves)
from igpt.train.trainer import Trainer
from igpt.viz import grid_table, save_png
from igpt.weights import checkpoint as ckpt

log = logging.getLogger(__name__)


def pretrain(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, out_dir: str | Path, *,
             progress: bool = True, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Pretrain a new model into the run directory ``out_dir`` (absent or empty). Under torchrun every process
    calls this; only rank 0 writes files and shows progress. Returns the last train and validation metrics
    and the newest checkpoint. SIGTERM or Ctrl-C ends the current step, writes a checkpoint and raises
    ``igpt.stop.Stopped`` (see ``igpt.stop``)."""
    return _launch(model_cfg, cfg, data_cfg, Path(out_dir), False, progress, on_step)


def resume(run_dir: str | Path, *, changes: Mapping[str, Any] | None = None, progress: bool = True,
           on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest readable checkpoint, with the configs in its run.json;
    the loss curve is the one an uninterrupted run would have drawn. ``changes`` (flag name -> value, as
    ``{"max_steps": 20000}``) may alter the settings in ``igpt.config.RESUME_CHANGES``; any other setting
    that differs from the run's is refused, as is data or a tokenizer that changed since the run started."""
    run_dir = Path(run_dir)
    model_cfg, cfg, data_cfg = read_run(run_dir, dict(changes or {}))
    ckpt.require_run_shape(run_dir, model_cfg)
    return _launch(model_cfg, cfg, data_cfg, run_dir, True, progress, on_step)


def _launch(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path, resuming: bool,
            progress: bool, on_step: Callable[[int, dict[str, float]], None] | None) -> dict[str, Any]:
    if cfg.tensorboard:
        require_tensorboard()  # before the processes start and the data is read
    world, device = init_distributed(cfg.device, cfg.dist_timeout)
    clean = False
    try:
        with GracefulStop("pretrain") as stop:
            result = _run(model_cfg, cfg, data_cfg, run_dir, resuming, world, device, progress, on_step, stop)
        clean = True
        return result
    except Stopped:
        clean = True  # every rank stopped at the same step, by agreement
        raise
    except Exception as e:
        if world.size > 1 and is_communication_error(e):
            raise peer_lost(world, e, f"Resume with: igpt pretrain --resume {run_dir}") from e
        raise
    finally:
        shutdown(world, clean)


def _agree(failed: BaseException | None, world: World, device: str, what: str) -> None:
    """Every rank raises when rank 0 could not start (its own error there, a pointer to it elsewhere)."""
    if any_across(failed is not None, world, torch.device(device) if world.size > 1 else torch.device("cpu")):
        raise failed or ValueError(f"rank {world.rank}: rank 0 could not {what}; see its message")


def _run(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path, resume: bool,
         world: World, device: str, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None,
         stop: GracefulStop) -> dict[str, Any]:
    lock, failed = None, None
    if world.is_main:
        try:
            lock = claim_run(run_dir, resume)
        except (ValueError, OSError) as e:
            failed = e
    _agree(failed, world, device, f"claim {run_dir}")
    try:
        return _run_locked(model_cfg, cfg, data_cfg, run_dir, resume, world, device, progress, on_step, stop, lock)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path, resume: bool,
                world: World, device: str, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None,
                stop: GracefulStop, lock: DirLock | None) -> dict[str, Any]:
    try:  # until training starts, a failure of a new run (a bad input) or a stop undoes it
        with stop.at_once():
            trainer, data_identity = _setup(model_cfg, cfg, data_cfg, run_dir, resume, world, device)
    except Exception as e:
        if not resume and lock is not None:
            lock.discard()
        if isinstance(e, Stopped):
            kept = (f"its checkpoints are as they were; continue with: igpt pretrain --resume {run_dir}" if resume
                    else f"nothing was trained, so {run_dir} is not kept")
            raise Stopped(f"{e}; {kept}") from None
        raise
    if world.is_main:
        write_json(run_dir / RUN_FILE, run_record(trainer.model_cfg, cfg, data_cfg, data_identity,
                                                 trainer.tokenizer.fingerprint()))
        log.info("%s: %s parameters, %d training images, warm-up %d steps, %d process(es) on %s (%s)", run_dir,
                 f"{trainer.model.num_params():,}", trainer.n_train, trainer.warmup, world.size, device,
                 trainer.fast_paths())
    metrics_log = MetricsLog(run_dir, cfg.tensorboard) if world.is_main else None
    try:
        return _loop(trainer, metrics_log, progress and world.is_main, on_step, stop)
    finally:
        if metrics_log is not None:
            metrics_log.close()


def _setup(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path, resume: bool,
           world: World, device: str) -> tuple[Trainer, dict[str, Any]]:
    """(The trainer of a new run, or of a resumed one at its checkpoint; the data's identity), after
    checking a resumed run's data against the identity recorded when it started."""
    if world.is_main:
        for left in remove_leftovers(run_dir) + remove_leftovers(run_dir / "checkpoints"):
            log.info("removed %s, left by a write that was killed part-way", left)
    data_identity = identity(data_cfg.data)
    if resume:
        recorded = read_run_file(run_dir).get("data_identity")
        if recorded is not None and recorded != data_identity:
            raise ValueError(f"--resume {run_dir}: the data {data_cfg.data} has changed since the run started "
                             f"(recorded {recorded}, found {data_identity}); resume with the run's data, or start "
                             "a new run with --out")
    elif world.is_main:
        # Written before anything slow, so a run killed at any point can be resumed.
        write_json(run_dir / RUN_FILE, run_record(model_cfg, cfg, data_cfg, data_identity, None))
    barrier(world)
    trainer = Trainer(model_cfg, cfg, data_cfg, run_dir, resume, world, device)
    if resume and ckpt.step_checkpoints(run_dir):
        trainer.restore()
    elif resume and world.is_main:
        truncate_metrics(run_dir, 0)  # killed before its first checkpoint: start over
    return trainer, data_identity


def _write_samples(t: Trainer, metrics_log: MetricsLog | None) -> None:
    """Rank 0 writes the --sample-every grid as a PNG (and to TensorBoard); the other ranks wait for it."""
    if t.world.is_main and metrics_log is not None:
        side = t.tokenizer.pixel_side(t.model_cfg.n_px)  # each image shown about 128 pixels wide
        table = grid_table(t.samples(), ncol=4, scale=max(1, 128 // side), pad=2,
                           title=f"{t.cfg.objective.upper()} samples · step {t.step} · seed {t.cfg.seed}")
        save_png(table.image, t.run_dir / "samples" / f"step-{t.step:07d}.png")
        metrics_log.image("samples", np.asarray(table.image), t.step)
    barrier(t.world)


def _loop(t: Trainer, metrics_log: MetricsLog | None, progress: bool,
          on_step: Callable[[int, dict[str, float]], None] | None, stop: GracefulStop) -> dict[str, Any]:
    cfg, images_per_step = t.cfg, t.cfg.batch_size * t.cfg.grad_accum
    result: dict[str, Any] = last_metrics(t.run_dir)
    bar = tqdm(total=cfg.max_steps, initial=t.step, disable=not progress, desc="pretrain", unit="step")
    shown = {"val_loss": f"{result['val']['loss']:.4f}"} if "loss" in result.get("val", {}) else {}
    try:  # the bar's line is ended on errors too, so an error message starts on a line of its own
        t.model.train()
        tick = time.perf_counter()
        while t.step < cfg.max_steps:
            metrics = t.train_step()
            now = time.perf_counter()
            metrics["img_per_s"] = images_per_step / (now - tick)
            tick = now
            result["train"] = metrics
            if metrics_log and (t.step % cfg.log_every == 0 or t.step == cfg.max_steps):
                metrics_log.write({"split": "train", "step": t.step, **metrics})
            if t.val_set is not None and (t.step % cfg.eval_every == 0 or t.step == cfg.max_steps):
                if (val := t.validate()) is not None:
                    result["val"] = val
                    metrics_log.write({"split": "val", "step": t.step, **val})
                    shown["val_loss"] = f"{val['loss']:.4f}"
                tick = time.perf_counter()
            if cfg.sample_every and (t.step % cfg.sample_every == 0 or t.step == cfg.max_steps):
                _write_samples(t, metrics_log)
                tick = time.perf_counter()
            stopping = any_across(stop.requested, t.world, t.device) and t.step < cfg.max_steps
            kept = cfg.keep_every and t.step % cfg.keep_every == 0  # a checkpoint --keep-every keeps
            if stopping or kept or t.step % cfg.ckpt_every == 0 or t.step == cfg.max_steps:
                t.save()
                tick = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", **shown, img_s=f"{metrics['img_per_s']:.0f}")
            if on_step is not None:
                on_step(t.step, metrics)
            if stopping:
                _curves(t)
                raise Stopped(f"stopped by {stop.signal_name or 'a signal to another process'} at step {t.step} of "
                              f"{cfg.max_steps}; checkpoint {ckpt.resolve_checkpoint(t.run_dir)}; continue with: "
                              f"igpt pretrain --resume {t.run_dir}")
    finally:
        bar.close()
    _curves(t)
    result["checkpoint"] = str(ckpt.resolve_checkpoint(t.run_dir))
    return result


def _curves(t: Trainer) -> None:
    if t.world.is_main:
        write_curves(t.run_dir, f"pretraining ({t.cfg.objective.upper()}) · {t.run_dir.name}",
                     "loss (nats per token)")
