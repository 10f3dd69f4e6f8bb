"""Data-parallel fine-tuning (PyTorch DDP) launched by torchrun: the little that differs from one process.

A ``finetune@<b>`` stage whose ``backbones.<b>.nprocs`` is above 1 re-launches itself through
``python -m torch.distributed.run`` (torchrun) on this node; on several nodes the user starts torchrun on each
(README). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which ``init_from_env`` reads.

Conventions: ``batch`` in params is the global batch; each of N processes takes B/N of every global batch, so N
processes train like one process with batch B (gradients are averaged by DDP's all-reduce). Rank 0 alone
validates, writes checkpoints and curves, and talks to MLflow.

``Dist`` is where a process sits and what the training loop asks of the group (seed per rank, wrap the model,
shard the data, broadcast, sum); on one process (``SINGLE``) the model and the data stay as they are and nothing
is communicated.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

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

    def seed(self, seed: int, resumed_after: int = 0) -> int:
        """This rank's seed: ``seed + rank``, so stochastic layers such as DropPath differ per rank (data order
        and augmentation do not depend on it). A run resumed after epoch ``resumed_after`` > 0 gets another one:
        the resume state holds rank 0's RNG only."""
        return seed + self.rank + 1_000_003 * resumed_after

    def sync_batchnorm(self, model: nn.Module, device: torch.device) -> None:
        """On CUDA under DDP, the BatchNorm layers of ``model`` become SyncBatchNorm, so that their statistics span
        the global batch (children replaced in place, same keys)."""
        if self.enabled and device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` as DDP trains it: wrapped in DistributedDataParallel, which broadcasts rank 0's weights now and
        averages the gradients in backward(). ``model`` itself on one process."""
        if not self.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, order: list[int]) -> list[int]:
        """This rank's items of a global ``order``: r, r+N, r+2N, ... of it (``DistributedSampler`` without
        shuffling, whole rounds only). All of ``order`` on one process."""
        if not self.enabled:
            return order
        sampler = DistributedSampler(order, num_replicas=self.world, rank=self.rank, shuffle=False, drop_last=True)
        return [order[i] for i in sampler]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; CPU tensors travel too). ``obj`` itself on one process."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (in float64, so loss sums stay exact enough to log); as floats."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


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
