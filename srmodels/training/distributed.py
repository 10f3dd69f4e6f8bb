"""Data-parallel fine-tuning (PyTorch DDP) launched by torchrun: the little that differs from one process.

A ``finetune@<b>`` stage whose ``backbones.<b>.nprocs`` is above 1 re-launches itself through
``python -m torch.distributed.run`` (torchrun) on this node; on several nodes the user starts torchrun on each
(README). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which ``init_from_env`` reads.

Conventions: ``batch`` in params is the global batch; each of N processes takes B/N of every global batch, so N
processes train like one process with batch B (gradients are averaged by DDP's all-reduce). Rank 0 alone
validates, writes checkpoints and curves, and talks to MLflow.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` among ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ENV_KEYS)


def torchrun_command(script: str, args: Sequence[str], nprocs: int, *, module: bool = False) -> list[str]:
    """The command that runs ``script args`` (a module name with ``module=True``, as ``python -m`` would) as
    ``nprocs`` processes on this node (a private rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
            *(["-m"] if module else []), script, *args]


def init_from_env(device_type: str, timeout_minutes: int = 30) -> Dist:
    """Join the process group torchrun described (NCCL on CUDA, gloo on CPU); SINGLE when not under torchrun.

    The timeout is generous because rank 0 validates alone after each epoch while the others wait.
    """
    if not launched_by_torchrun():
        return SINGLE
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if info.world == 1:
        return SINGLE
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    log.info("DDP: rank %d of %d (local rank %d, backend %s)", info.rank, info.world, info.local_rank,
             dist.get_backend())
    return info


def shutdown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Dist:
    """The process group's view of this process (SINGLE when no group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def broadcast_object(obj: Any, info: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; CPU tensors travel too). Identity on one process."""
    if not info.enabled:
        return obj
    box = [obj if info.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: Sequence[float], info: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (in float64, so loss sums stay exact enough to log)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
