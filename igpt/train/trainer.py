"""The state of one pretraining run and its step: the model (wrapped for DDP or FSDP2 under torchrun), the
optimizer, the data stream, the tokenizer, checkpoints written and restored, validation and the
--sample-every samples. ``igpt.train.pretrain`` runs it: the loop, the lock and the launch."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.data.imageset import ImageSet, check_ids
from igpt.data.open import check_upscale, open_training
from igpt.data.streams import fixed_batches
from igpt.distributed import (World, barrier, is_communication_error, mean_across)
from igpt.generate.infill import infill
from igpt.generate.sample import make_generator, sample
from igpt.model import GPT
from igpt.objectives import ar_loss, bert_loss, mean_loss, nats_to_bits, sample_keep_mask
from igpt.tokenizers import (VQ_EXTENSION, AnyTokenizer, Palette, load_from, load_tokenizer, recorded_fingerprint,
                             save_in, stored_in)
from igpt.record import CheckpointRecord, read_as
from igpt.runtime import (autocast, compile_enabled, derived_generator, derived_seed, resolve_device,
                          resolve_dtype, seed_everything)
from igpt.train.optim import pretrain_lr, pretrain_optimizer, set_lr, warmup_steps
from igpt.train.rundir import (read_run_file,
                               truncate_metrics)
from igpt.weights import checkpoint as ckpt
from igpt.weights.convert import load
from igpt.weights.sharded import load_sharded, save_sharded
log = logging.getLogger(__name__)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
N_SAMPLES = 16  # images in a --sample-every grid (4 x 4)


def micro_loss(forward: torch.nn.Module, ids: torch.Tensor, cfg: TrainConfig, step: int, micro: int = 0,
               rows: slice = slice(None)) -> torch.Tensor:
    """The pretraining loss of one micro-batch (``rows`` of it on this process). A BERT mask of the whole
    micro-batch is drawn from (seed, step, micro) and sliced, so it is the same after a resume and whatever
    the number of processes."""
    if cfg.objective == "ar":
        return ar_loss(forward, ids)
    generator = derived_generator(cfg.seed, step, micro)
    keep = sample_keep_mask((cfg.batch_size, ids.shape[1]), cfg.mask_prob, generator)
    return bert_loss(forward, ids, keep=keep[rows].to(ids.device))


def init_model(model_cfg: ModelConfig, cfg: TrainConfig) -> GPT:
    """A model initialised (from the global seed) for pretraining with ``cfg``: read as its objective trains
    it, with activation checkpointing as asked, and BERT's SOS vector frozen (BERT never reads it, and DDP
    insists that every trained parameter is used)."""
    model = GPT(model_cfg, causal=read_as(cfg.objective, cfg.mask_prob).causal)
    model.grad_checkpoint = cfg.grad_checkpoint
    if not model.causal:
        model.sos.requires_grad_(False)
    return model


def resolve_tokenizer(data_cfg: DataConfig, train: ImageSet, seed: int, device: torch.device) -> AnyTokenizer:
    """The given tokenizer file (checked against the data), or a palette fitted on the training pixels."""
    if data_cfg.tokenizer is not None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
        check_ids(train, tokenizer, any_palette=data_cfg.any_palette)
        return tokenizer
    if train.pixels is None:
        hint = ("OpenAI's kmeans_centers.npy" if train.tokenizer_fingerprint is None
                else f"the tokenizer {train.tokenizer_fingerprint} it was prepared with")
        raise ValueError(f"{train.source} holds ids, not pixels: pass --tokenizer with {hint}")
    log.info("fitting a %d-colour palette on %d training images", data_cfg.vocab_size, len(train))
    return Palette.fit(train.pixels, k=data_cfg.vocab_size, seed=seed, device=device)


class Trainer:
    """State of one pretraining run (one process of it under torchrun); ``pretrain`` is the entry point."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig, run_dir: Path,
                 resume: bool, world: World, device: str) -> None:
        self.cfg, self.data_cfg, self.run_dir, self.world = cfg, data_cfg, run_dir, world
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.rows = world.slice(cfg.batch_size)  # this process's share of every micro-batch
        seed_everything(cfg.seed)
        side = self._image_side(model_cfg.n_px, resume)
        data = open_training(data_cfg.data, side, batch_size=cfg.batch_size, seed=cfg.seed,
                             device=self.device, augment=cfg.augment, workers=cfg.workers,
                             val_fraction=data_cfg.val_fraction, resize=data_cfg.resize,
                             validate=cfg.eval_every > 0, val_images=cfg.eval_batches * cfg.batch_size,
                             rows=self.rows, any_palette=data_cfg.any_palette)
        self.fit_set, self.n_train, self.val_set = data.fit_set, data.n_train, data.val_set
        self.tokenizer = self._tokenizer(resume)
        self.model_cfg = replace(model_cfg, n_vocab=self.tokenizer.k)
        self.model = init_model(self.model_cfg, cfg).to(self.device)  # same seed on every rank: identical replicas
        self.sharded = cfg.fsdp and world.size > 1
        if self.sharded and cfg.sample_every:
            raise ValueError("--sample-every needs the whole model on one process; under --fsdp it is sharded. "
                             "Sample a checkpoint with igpt sample instead")
        if self.sharded:  # each block its own unit, so only one block's parameters are gathered at a time
            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        self.optimizer = pretrain_optimizer(self.model, cfg, self.device)  # after sharding: it holds the shards
        self.stream = data.make_stream(self.tokenizer)
        self.warmup = warmup_steps(cfg, self.n_train)
        self.step = 0
        self.compiled = compile_enabled(cfg.compile, self.device)
        self.forward = torch.compile(self.model) if self.compiled else self.model
        if world.size > 1 and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.forward, device_ids=ids)

    def fast_paths(self) -> str:
        """What this run uses of the options that make a step faster or smaller, for the log."""
        parts = [f"{str(self.dtype).removeprefix('torch.')} autocast" if self.dtype != torch.float32 else "fp32",
                 "compiled" if self.compiled else "eager", "fused AdamW" if self.device.type == "cuda" else "AdamW",
                 "FSDP" if self.sharded else "DDP" if self.world.size > 1 else "one process"]
        return ", ".join(parts + ["activation checkpointing"] * self.cfg.grad_checkpoint)

    def _image_side(self, n_px: int, resume: bool) -> int:
        """The side of the images the run reads: n_px for a palette, a VQ-VAE tokenizer's input side (whose
        grid must be n_px; smaller images are refused unless --upscale)."""
        stored = stored_in(self.run_dir) if resume else None
        path = stored if stored is not None else self.data_cfg.tokenizer
        if path is None or Path(path).suffix.lower() != VQ_EXTENSION:
            return n_px
        side = load_tokenizer(path).pixel_side(n_px)
        if not resume:
            check_upscale(self.data_cfg.data, side, self.data_cfg.upscale)
        return side

    def _tokenizer(self, resume: bool) -> AnyTokenizer:
        """The run's tokenizer: the saved one on resume (checked against the fingerprint its checkpoints
        record); else rank 0 fits or loads it and the others read it."""
        path = stored_in(self.run_dir)
        if resume and path is not None:
            tokenizer = load_tokenizer(path)
            expected = self._recorded_fingerprint()
            if expected is not None and tokenizer.fingerprint() != expected:
                word = "palette" if tokenizer.kind == "palette" else "tokenizer"  # a VQ-VAE is no palette
                raise ValueError(f"{path} has {word} {tokenizer.fingerprint()}, but the run trained with {expected}: "
                                 f"it was replaced; put the run's {word} back, or start a new run")
            # a new run checks in resolve_tokenizer, before writing its tokenizer
            check_ids(self.fit_set, tokenizer, any_palette=self.data_cfg.any_palette)
            return tokenizer
        if self.world.is_main:
            save_in(resolve_tokenizer(self.data_cfg, self.fit_set, self.cfg.seed, self.device), self.run_dir)
        barrier(self.world)
        return load_from(self.run_dir)

    def _recorded_fingerprint(self) -> str | None:
        """The fingerprint of the tokenizer the run trained with: its newest checkpoint's, else run.json's."""
        for ckpt_dir in reversed(ckpt.step_checkpoints(self.run_dir)):
            try:
                return ckpt.read_record(ckpt_dir).tokenizer_fingerprint
            except ValueError:
                continue  # an unreadable checkpoint; restore() says so
        return recorded_fingerprint(read_run_file(self.run_dir))

    def restore(self) -> None:
        """Continue from the newest checkpoint that reads whole. Newer ones that do not (a truncated file, a
        corrupt training state) are set aside as ``.step-N.unreadable``, with a warning each; when none reads,
        nothing is moved and the error names the newest one's fault."""
        failed: list[tuple[Path, str]] = []
        for ckpt_dir in reversed(ckpt.step_checkpoints(self.run_dir)):
            try:
                self._restore_from(ckpt_dir)
                break
            except Exception as e:
                if self.world.size > 1 and is_communication_error(e):
                    raise
                reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                log.warning("%s cannot be resumed from (%s); trying the checkpoint before it", ckpt_dir, reason)
                failed.append((ckpt_dir, reason))
        else:
            raise ValueError(f"--resume {self.run_dir}: no checkpoint can be read; the newest: {failed[0][1]}")
        barrier(self.world)  # every rank has read the checkpoint before rank 0 renames or rewrites anything
        if self.world.is_main:
            for ckpt_dir, _ in failed:  # newer than the one resumed from: they would be taken for the newest
                aside = ckpt_dir.with_name(f".{ckpt_dir.name}.unreadable")
                shutil.rmtree(aside, ignore_errors=True)
                ckpt_dir.rename(aside)
            truncate_metrics(self.run_dir, self.step)
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def _restore_from(self, ckpt_dir: Path) -> None:
        state = ckpt.load_train_state(ckpt_dir)
        if ckpt.read_record(ckpt_dir).sharded:  # each rank reads the slices it owns, whoever wrote them
            load_sharded(ckpt_dir, self.model, self.optimizer)
        else:
            model, _, _ = load(ckpt_dir, "cpu")
            # Full (unsharded, name-keyed) state dicts: a run resumes on any number of processes, DDP or FSDP.
            set_model_state_dict(self.model, model.state_dict(), options=FULL_STATE)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=FULL_STATE)
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])

    def _train_state(self) -> dict[str, Any]:
        state = {"step": self.step, "stream": self.stream.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> None:
        """A full checkpoint (rank 0 writes, after the full weights and optimizer state are gathered, a
        collective under FSDP), or with --sharded-checkpoint every rank writes its own shards."""
        ckpt_dir = self.run_dir / "checkpoints" / f"step-{self.step:07d}"
        causal = self.model.causal
        record = CheckpointRecord(self.model_cfg, self.tokenizer.fingerprint(), self.cfg.objective,
                                  None if causal else self.cfg.mask_prob, self.step, data=self.data_cfg.data)
        if self.cfg.sharded_checkpoint:
            record = record.replace(sharded=True, saved_by_processes=self.world.size)
            save_sharded(ckpt_dir, self.model, self.optimizer, self.world, lambda tmp: ckpt.write_small_files(
                tmp, record, self.tokenizer, self._train_state()))
        else:
            weights = get_model_state_dict(self.model, options=FULL_STATE)
            optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
            if self.world.is_main:
                ckpt.save_checkpoint(ckpt_dir, self.model, self.tokenizer, record,
                                     {**self._train_state(), "optimizer": optimizer}, state_dict=weights)
        if self.world.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_last, self.cfg.keep_every)
        barrier(self.world)

    def _micro_loss(self, ids: torch.Tensor, micro: int) -> torch.Tensor:
        return micro_loss(self.forward, ids, self.cfg, self.step, micro, self.rows)

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients across ranks only on the last micro-batch of a step."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        elif self.world.size > 1 and not last:
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        if self.model_cfg.dropout > 0:  # dropout masks: from (seed, step, rank), so ranks differ and resume exactly
            torch.manual_seed(derived_seed(cfg.seed, self.step, self.world.rank))
        lr = pretrain_lr(self.step, cfg, self.warmup)
        set_lr(self.optimizer, lr)
        total = 0.0
        for micro in range(cfg.grad_accum):
            ids = self.stream.next()
            with self._grad_sync(micro == cfg.grad_accum - 1):  # gradients are averaged on the last one
                with autocast(self.device, self.dtype):
                    loss = self._micro_loss(ids, micro)
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        total = mean_across(total, self.world, self.device)
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {self.step}: the learning rate is too high "
                                     f"for this run; start a new run with a lower --lr")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total, "bits": nats_to_bits(total), "lr": lr, "grad_norm": float(norm)}

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        """``N_SAMPLES`` images (n, n_px, n_px, 3) uint8 from the current weights, drawn with the run's seed
        (the same noise at every call, so successive grids differ by the model alone): sampled left to right
        by an AR model, infilled from a blank canvas by a BERT one. The training RNG is left as it was, so a
        run with samples trains exactly as one without."""
        T = self.model_cfg.n_ctx
        generator = make_generator(self.cfg.seed, self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.model.causal:
                ids = sample(self.model, N_SAMPLES, generator=generator, dtype=self.dtype)
            else:
                blank = torch.zeros(N_SAMPLES, T, dtype=torch.long, device=self.device)
                ids = infill(self.model, blank, torch.zeros_like(blank, dtype=torch.bool), generator=generator,
                             dtype=self.dtype)
        self.model.train()
        return self.tokenizer.decode_images(ids.cpu()).numpy()  # (n, side, side, 3): the tokenizer's images

    def validate(self) -> dict[str, float] | None:
        """Validation loss on the unwrapped model: computed by rank 0 while the others wait, or under FSDP by
        every rank (each forward pass gathers the shards), with rank 0 reporting it."""
        result = None
        if self.world.is_main or self.sharded:
            batches = fixed_batches(self.val_set, self.cfg.batch_size, self.cfg.eval_batches, self.tokenizer,
                                    self.device)
            result = mean_loss(self.model, batches, self.cfg.objective, self.cfg.mask_prob, self.cfg.seed,
                              self.dtype)
        barrier(self.world)
        return result if self.world.is_main else None
