"""Data-parallel training under ``torchrun``: process-group set-up and the few collectives the loop needs.

``torchrun --nproc_per_node=N -m igpt pretrain ...`` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK in their environment; ``init_distributed`` reads them when training starts (never at import).
A plain ``igpt pretrain`` has no such variables and runs as a world of one.

The global batch does not depend on the number of processes: each step's micro-batch of ``--batch-size``
images (and its augmentation draws and BERT masks) is chosen exactly as in a single process, and rank r
takes the r-th contiguous slice of it.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


class PeerLostError(RuntimeError):
    """Another process of the run died or stopped answering: this one stops too, instead of waiting forever.
    The process should exit after it (``igpt`` does, with ``os._exit``): freeing the objects of the broken
    process group can block."""


def is_communication_error(e: BaseException) -> bool:
    """Failures of a collective: NCCL and store errors are DistError; gloo raises RuntimeError naming itself."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection reset",
                                                                    "Connection closed", "Broken pipe"))


def peer_lost(world: World, e: BaseException, resume_hint: str) -> PeerLostError:
    """The one-line error of a rank whose peers vanished (the original exception stays chained)."""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", reason)  # gloo's source location tells a user nothing
    return PeerLostError(f"rank {world.rank} of {world.size}: lost contact with another process of the run "
                         f"({reason[:200]}); check that process's log. {resume_hint}")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (n must divide evenly)."""
        if n % self.size:
            raise ValueError(f"--batch-size {n} is not divisible by the {self.size} processes")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (its environment says so)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str, timeout_minutes: float = 10.0) -> tuple[World, str]:
    """Join the torchrun process group if launched by torchrun. Returns the world and the device name
    this rank should use (``cuda:LOCAL_RANK`` for GPUs; the CPU uses the gloo backend). A collective that
    waits longer than ``timeout_minutes`` for the other processes fails instead of hanging."""
    if not launched_by_torchrun():
        return World(), device_name
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
        device_name = f"cuda:{world.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return world, device_name


def mean_across(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-rank scalar over all ranks (identity in a single process)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def any_across(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop request that reached only some processes)."""
    if world.size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others, so that none tears
    down its connections while a peer's last collective is still in flight (gloo aborts the process when
    that happens at exit); after an error there may be no peer left to wait for."""
    if world.size > 1 and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
