"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every process writes its own part.

A full checkpoint (``igpt.weights.checkpoint``) gathers the whole model and optimizer state on rank 0 first, which
for iGPT-XL (6.8B parameters, 82 GB of fp32 weights and Adam moments) is more than one host should hold.
With ``--sharded-checkpoint`` each process writes only the shards it owns, in parallel, and the files are
keyed by parameter name and global shape, not by process, so a run resumes on any number of processes
(DCP re-slices on load). Layout of a sharded step checkpoint::

    step-0001000/
      config.json         the record, with "sharded": true (its declared kind) and "saved_by_processes"
      palette.npz
      train_state.pt      step, data position and RNG state (the optimizer is in the shards)
      sharded/            DCP files: .metadata and one __<rank>_<n>.distcp per writing process
                          {"model": name-keyed weights, "optim": name-keyed Adam state}

``igpt.load`` reads it directly in one process; ``igpt convert --consolidate`` turns it into a single
``model.safetensors`` checkpoint. As with full checkpoints the directory is assembled under a temporary
name and renamed into place (under torchrun that name must be on a filesystem every node sees).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from igpt.atomic import move_into_place
from igpt.distributed import World, barrier

SHARDS = "sharded"


def _no_dist() -> bool:
    """DCP's single-process mode: no process group to coordinate through."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def save_sharded(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World,
                 write_rest: Any) -> None:
    """Collective: every rank writes its shards of the model and optimizer into ``ckpt_dir/sharded``;
    rank 0 then calls ``write_rest(tmp_dir)`` for the small files and renames the directory into place."""
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-sharded")  # one name that every rank agrees on
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier(world)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp / SHARDS, no_dist=_no_dist())
    barrier(world)  # every rank's shard is on disk before the directory becomes visible
    if world.is_main:
        write_rest(tmp)
        move_into_place(tmp, ckpt_dir)
    barrier(world)


def load_sharded(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: fill ``model`` (plain, DDP-replicated or FSDP-sharded) and ``optimizer`` from a sharded
    checkpoint written by any number of processes. A tensor missing from the checkpoint is an error."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # DCP warns that a single process is assumed, which is the point
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=Path(ckpt_dir) / SHARDS, no_dist=_no_dist())
    except Exception as e:  # DCP wraps per-rank failures in its own exception types
        raise ValueError(f"{ckpt_dir / SHARDS}: cannot load this sharded checkpoint into the model: "
                         f"{str(e).strip().splitlines()[-1][:300]}") from e
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
