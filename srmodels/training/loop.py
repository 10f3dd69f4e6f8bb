"""The one training loop, ``fit``: backbone fine-tuning (``srmodels.finetune``) and the fusion net
(``srmodels.fusion_training``) both run it.

What the loop does the same for every job: validate after every epoch on the validation split only (PSNR on Y,
border cropped, the output quantised to uint8 as when it is saved), epoch 0 included, so an initial (e.g.
pretrained) model that training only makes worse is reported, and kept, as the best; keep the best epoch as a
self-describing ``best.pth``; write ``curve.csv``; step the LR schedule; resume exactly; run data-parallel.
What differs between jobs is a ``Job``: the module, its data, its loss, how it predicts a validation image, and
what its checkpoint says about it. The numbers that choose a run are a ``TrainConfig``.

EMA (``TrainConfig.ema_decay`` > 0): an exponential moving average of the weights, updated after every optimizer
step as ``ema = decay * ema + (1 - decay) * weight`` (KAIR's and BasicSR's formula, no warm-up and no bias
correction) from the initial weights: the pretrained ones when fine-tuning, so epoch 0 validates the same model
with or without EMA. Floating-point parameters are averaged; buffers (BatchNorm statistics and counters) are
copied from the trained weights. Validation, model selection, ``curve.csv`` and the metrics are then the EMA's,
best.pth holds the EMA weights (``state_dict`` and ``params_ema``) and the raw ones of the same step (``params``),
and the resume state holds the EMA, so a resumed run still equals an uninterrupted one. Decay 0 is off: nothing
is averaged and every output is what it was before EMA existed.

Reproducibility: ``seed_everything`` seeds Python, NumPy and torch and, on CPU, asks for deterministic kernels.
Data order and augmentation are pure functions of (seed, epoch, index) (see ``srmodels.datasets``), so CPU runs
with the same seed and thread count give bit-identical weights, and a resumed run gives the weights of an
uninterrupted one. CUDA runs are seeded the same way but not bit-exact (atomics in cuDNN/cuBLAS kernels).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from srmodels.training import distributed
from srmodels.core import layout
from srmodels.models.checkpoint import save_checkpoint
from srmodels.core.errors import UserError
from srmodels.data.images import to_uint8
from srmodels.metrics.psnr_ssim import calculate_psnr
from srmodels.core.runtime import seed_everything, set_threads

log = logging.getLogger(__name__)

LogMetrics = Callable[[dict[str, float], int], None]
# (name, HR uint8 HxWx3, SR (1, 3, H, W) on the [0, 1] scale) of one validation item.
Predict = Callable[[Any], tuple[str, np.ndarray, torch.Tensor]]
SCHEDULES = ("cosine", "multistep", "constant")
RESUME_FORMAT = "srmodels-resume-v2"
# curve.csv holds only what the seed determines; wall-clock seconds go to the run record (see ``timing``).
CURVE_FIELDS = ("epoch", "train_loss", "val_psnr", "lr")
COSINE_ETA_MIN = 1e-7  # floor of the per-iteration cosine schedule (BasicSR's value)
ADAM_BETAS = (0.9, 0.999)  # torch's defaults
# Warn when the initial weights keep more than this share of the EMA at the end (decay ** steps).
EMA_INITIAL_SHARE_WARNING = 0.05


class ConfigError(UserError):
    """A training setting out of range (epochs, batch, schedule, ...)."""


@dataclass(frozen=True)
class TrainConfig:
    """The settings that choose a training run (the job brings the model and the data).

    ``schedule``: 'cosine' (stepped every iteration, to 1e-7 at the end), 'multistep' (stepped every epoch, x
    ``gamma`` at each of ``milestones``) or 'constant'. ``batch`` is the global batch under DDP. ``threads``:
    CPU intra-op threads (None: leave torch's setting). ``workers``: DataLoader processes (items do not depend
    on them). ``compile``: ``torch.compile`` the training forward (fixed crop shapes, so one compilation);
    validation sees whole images of varying sizes and stays eager. ``ema_decay``: in [0, 1); > 0 validates,
    selects and saves an exponential moving average of the weights (see the module docstring), 0 is off.
    """

    epochs: int
    batch: int
    lr: float
    crop_border: int
    seed: int = 0
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.5
    betas: tuple[float, float] = ADAM_BETAS
    threads: int | None = None
    workers: int = 0
    compile: bool = False
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        # Stages pass lists from params.yaml; tuples keep the config hashable and its JSON form the same.
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: unknown {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        # One setting per message, named: params.py names the params key before a stage gets here.
        if self.epochs < 0:  # 0: validate and save the initial weights, train nothing
            raise ConfigError(f"epochs: must be >= 0 (0 = keep the initial weights), got {self.epochs}")
        if self.batch < 1:
            raise ConfigError(f"batch: must be >= 1, got {self.batch}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr} (epochs 0 keeps the initial weights)")
        if not self.gamma > 0:
            raise ConfigError(f"gamma: must be > 0, got {self.gamma}")
        if any(m < 1 for m in self.milestones):
            raise ConfigError(f"milestones: epochs, each >= 1; got {list(self.milestones)}")
        if not 0.0 <= self.ema_decay < 1.0:  # 1 would never move from the initial weights
            raise ConfigError(f"ema_decay: must be in [0, 1) (0: off), got {self.ema_decay}")
        for name, value, low in (("crop_border", self.crop_border, 0), ("workers", self.workers, 0),
                                 ("threads", 1 if self.threads is None else self.threads, 1)):
            if value < low:
                raise ConfigError(f"{name}: must be >= {low}, got {value}")


@dataclass(frozen=True)
class Job:
    """What one kind of training brings to ``fit``; everything else is the same loop."""

    model: nn.Module      # trained: optimised, wrapped by DDP / torch.compile, its forward called by ``loss``
    train: Dataset        # has ``set_epoch``; items are (inputs..., HR target), the target last
    val: Sequence[Any]    # validation items, as ``predictor`` reads them
    loss: Callable[[Callable[..., torch.Tensor], list[torch.Tensor]], torch.Tensor]  # (forward, batch) -> loss
    predictor: Callable[[torch.device], Predict]  # called once per validation, with ``model`` in eval mode
    describe: dict[str, Any]  # save_checkpoint's keywords (arch, kwargs, scale, input_range, ...; extra)
    identity: dict[str, Any] = field(default_factory=dict)  # what else a resume state must match (the data)
    weights: nn.Module | None = None  # the part of ``model`` best.pth and the resume state hold (None: model)


# --------------------------------------------------------------------------------------------- small helpers

def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a disabled context elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (the faster convolutions there); plain contiguous on CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _loader(dataset: Dataset, epoch: int, batch: int, seed: int, device: torch.device, workers: int,
            info: distributed.Dist = distributed.SINGLE) -> DataLoader:
    """This epoch's DataLoader: the order is a permutation drawn from (seed, epoch), so it does not depend on
    how many epochs ran before in this process (resume) nor on the workers.

    Under DDP ``batch`` is the global batch: every rank draws the same permutation and a ``DistributedSampler``
    (no shuffling of its own) gives rank r the items r, r+N, r+2N, ... of it, in batches of B/N. Global step s
    therefore trains on exactly the items order[s*B:(s+1)*B], the batch one process with batch B would see.
    """
    dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    order = np.random.default_rng((seed, epoch)).permutation(len(dataset)).tolist()
    if info.enabled:
        shard = DistributedSampler(order, num_replicas=info.world, rank=info.rank, shuffle=False, drop_last=True)
        order = [order[i] for i in shard]
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)  # only seeds the workers' own RNGs
    return DataLoader(dataset, batch_size=batch // info.world, sampler=order, num_workers=workers,
                      generator=generator, pin_memory=device.type == "cuda",
                      drop_last=_drop_last(len(dataset), batch))


def _drop_last(items: int, batch: int) -> bool:
    """Drop a ragged last batch (DAT's BatchNorm cannot train on a batch of one), unless it is the only one."""
    return items > batch


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":  # stepped every iteration
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1),
                                                          eta_min=COSINE_ETA_MIN)
    if config.schedule == "multistep":  # stepped every epoch
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.milestones),
                                                    gamma=config.gamma)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[], gamma=1.0)  # constant


class WeightsEma:
    """Exponential moving average of a module's weights, ``ema = decay * ema + (1 - decay) * weight`` after every
    ``update``, starting equal to the module's weights.

    Floating-point parameters are averaged; every other state_dict entry (BatchNorm running statistics and
    counters, constant buffers) is copied, so the average always runs with the statistics of the weights being
    trained. ``tensors`` is a state dict of the module (same keys, device and dtypes). Under DDP every rank holds
    the same weights after each step, so every rank's average is the same.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        live = module.state_dict(keep_vars=True)
        params = {id(p) for p in module.parameters()}
        self.averaged = [k for k, v in live.items() if id(v) in params and v.is_floating_point()]
        self.copied = [k for k in live if k not in set(self.averaged)]
        self.tensors = {k: v.detach().clone() for k, v in live.items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # The module's state_dict is read anew every time: a module may replace a buffer rather than update it.
        live = module.state_dict(keep_vars=True)
        ema = [self.tensors[k] for k in self.averaged]
        torch._foreach_mul_(ema, self.decay)
        torch._foreach_add_(ema, [live[k].detach() for k in self.averaged], alpha=1.0 - self.decay)
        for k in self.copied:
            self.tensors[k].copy_(live[k])

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from a saved average (``tensors`` as ``state`` returns it)."""
        if tensors.keys() != self.tensors.keys():
            raise ValueError("the saved EMA does not have the module's keys")
        with torch.no_grad():
            for k, v in tensors.items():
                self.tensors[k].copy_(v)

    def state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the averaged weights (for best.pth and the resume state)."""
        return {k: v.detach().cpu().clone() for k, v in self.tensors.items()}


@contextmanager
def _holding(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``module`` holds ``tensors`` inside the block and its own weights again afterwards, bit for bit (in-place
    copies: the optimizer's parameters stay the same objects)."""
    own = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(tensors)
    try:
        yield
    finally:
        module.load_state_dict(own)


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate(predict: Predict, items: Sequence[Any], crop_border: int) -> tuple[float, dict[str, float]]:
    """Mean and per-image PSNR on Y of ``predict``'s outputs, quantised to uint8 as when saved."""
    per_image: dict[str, float] = {}
    for item in items:
        with torch.no_grad():
            name, hr, sr = predict(item)
        # Contiguous: the metric's matrix product rounds differently on a strided view, which turns an exact
        # match (inf) into ~330 dB.
        sr_u8 = np.ascontiguousarray(to_uint8(sr))
        if sr_u8.shape != hr.shape:
            raise ValueError(f"{name}: output {sr_u8.shape[1]}x{sr_u8.shape[0]} does not match HR "
                             f"{hr.shape[1]}x{hr.shape[0]}")
        per_image[name] = calculate_psnr(sr_u8, hr, crop_border, True, data_range=255.0)
    if not per_image:
        raise ValueError("no validation images")
    return float(np.mean(list(per_image.values()))), per_image


# ---------------------------------------------------------------------------------------------- bookkeeping

def _write_curve(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite curve.csv from the whole history (so a resumed run's file is complete, not appended twice)."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_FIELDS})
    tmp.replace(path)


def _state_fingerprint(module: nn.Module) -> str:
    """Hash of a module's weights: resuming is only valid from the same starting point (pretrained or init)."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def files_fingerprint(paths: Sequence[str | Path]) -> str:
    """Hash of files' names, sizes and modification times: a resume state is only valid on the same data, and
    re-written inputs (a re-run prepare or cache stage) count as other data even when their names are kept."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _rng_states() -> dict[str, Any]:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])}}


def _set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(states["python"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


def _as_tuples(obj: Any) -> Any:
    """random.setstate wants nested tuples back."""
    return tuple(_as_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _resume_identity(job: Job, config: TrainConfig, weights: nn.Module) -> dict[str, Any]:
    """What a resume state must have been written with: the job, its initial weights and every setting that
    changes the numbers. ``epochs`` counts only for the cosine schedule, whose shape depends on it, so a
    constant or multistep run can be extended; workers and compile do not change the items or the loss."""
    settings = asdict(config)
    for key in ("workers", "compile", "threads"):
        settings.pop(key)
    if not config.ema_decay:  # off: the identity, and so the resume states, of runs from before EMA existed
        settings.pop("ema_decay")
    settings["epochs"] = config.epochs if config.schedule == "cosine" else None
    if config.schedule != "multistep":
        settings["milestones"] = settings["gamma"] = None
    return {"model": job.describe, "init_weights": _state_fingerprint(weights), **settings, **job.identity,
            # Numerics differ with the thread count and the kernels' instruction set: never mix them in one run.
            "threads": torch.get_num_threads(), "cpu_isa": os.environ.get("SRMODELS_CPU_ISA", "native")}


def _load_resume(path: Path, identity: Mapping[str, Any], epochs: int) -> dict[str, Any] | None:
    """The resume state in ``path`` if it was written by a run with this identity, else None (with a warning)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means "start fresh", never a crash
        log.warning("%s: unreadable (%s); starting fresh", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("%s: not a resume file of this version; starting fresh", path)
        return None
    old = json.loads(state["config"])
    if _canonical(old) != _canonical(identity):
        changed = sorted(k for k in set(old) | set(identity)
                         if _canonical(old.get(k)) != _canonical(identity.get(k)))
        log.warning("%s: written with another configuration (%s differ); starting fresh", path, ", ".join(changed))
        return None
    if state["epoch"] > epochs:
        log.warning("%s: already at epoch %d, beyond epochs=%d; starting fresh", path, state["epoch"], epochs)
        return None
    return state


def _timing(trained: Sequence[Mapping[str, Any]], resumed_from: int) -> dict[str, Any]:
    """Wall-clock figures of the trained epochs (all sessions of a resumed run): not functions of the seed."""
    seconds = float(sum(h["seconds"] for h in trained))
    samples, pixels = sum(h["samples"] for h in trained), sum(h["hr_pixels"] for h in trained)
    return {"resumed_from_epoch": resumed_from, "train_seconds": seconds,
            "samples_per_second": samples / seconds if seconds > 0 else None,
            "hr_megapixels_per_second": pixels / 1e6 / seconds if seconds > 0 else None,
            "epoch_seconds": [h["seconds"] for h in trained]}


# ------------------------------------------------------------------------------------------------- the loop

def fit(job: Job, config: TrainConfig, out_dir: str | Path, *, device: torch.device | str = "cpu",
        provenance: dict[str, Any] | None = None, resume_path: str | Path | None = None,
        log_metrics: LogMetrics | None = None) -> dict[str, Any]:
    """Train ``job.model`` with Adam on ``job.loss``, select on validation; returns summary metrics.

    Args:
        out_dir: receives best.pth (self-describing, highest val PSNR; epoch 0 = the initial model) and
            curve.csv.
        resume_path: where the state needed to continue after the last completed epoch is written after every
            epoch (None: nowhere, no resuming). A run finds it there and continues when it was written with the
            same job and settings (see ``_resume_identity``); otherwise it starts fresh with a warning. Keep it
            outside the stage's outputs: it is work in progress, not a result.
        log_metrics: called as ``log_metrics(metrics, epoch)`` after every epoch (epoch 0 included).

    ``config.epochs`` 0 trains nothing: epoch 0 is validated and best.pth holds the initial weights bit for bit
    (how released weights enter a fusion unchanged), curve.csv has that one row.

    With ``config.ema_decay`` > 0 every validation (epoch 0 included), the selection of the best epoch, curve.csv
    and the metrics returned are those of the weights' EMA (``WeightsEma``); best.pth holds the EMA weights as
    ``state_dict`` and ``params_ema`` and the raw ones as ``params``.

    Data-parallel (DDP) when called in every process of an initialised process group (``srmodels.distributed``):
    ``config.batch`` is then the global batch and must divide by the world size; rank 0 alone validates, writes
    out_dir and calls ``log_metrics``. Each rank is seeded with ``seed + rank`` (stochastic layers such as
    DropPath differ per rank; data order and augmentation do not depend on the rank). On CUDA, BatchNorm layers
    become SyncBatchNorm so that statistics span the global batch. The model is left holding the last epoch's
    weights (the raw ones when EMA is on).

    Returns:
        best_val_psnr, best_epoch, initial_val_psnr, final_val_psnr, final_train_loss, improved (whether any
        epoch beat the initial model), epochs, steps, world_size, best_per_image and, with EMA on,
        ema_decay: all functions of the seed and the data. ``timing`` holds what is not: resumed_from_epoch,
        train_seconds (training only, all sessions), samples_per_second and hr_megapixels_per_second (all
        ranks) and epoch_seconds. Ranks other than 0 return only epochs, steps and world_size.
    """
    device = torch.device(device)
    info = distributed.current()
    if config.batch % info.world:
        raise ConfigError(f"the global batch ({config.batch}) must divide by the number of processes "
                          f"({info.world})")
    set_threads(config.threads)
    seed_everything(config.seed + info.rank, device)
    out_dir = Path(out_dir)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    best_path, curve_path = out_dir / layout.BEST, out_dir / layout.CURVE
    resume_path = Path(resume_path) if resume_path is not None else None
    cuda = device.type == "cuda"
    model, weights, epochs = job.model, job.weights if job.weights is not None else job.model, config.epochs
    steps_per_epoch = len(job.train) // config.batch if _drop_last(len(job.train), config.batch) else 1
    identity = _resume_identity(job, config, weights)

    model.to(device=device, memory_format=memory_format(device))
    if info.enabled and cuda:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BatchNorm children in place, same keys
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    scheduler = _make_scheduler(optimizer, config, epochs * steps_per_epoch)
    # Built after the move and the SyncBatchNorm conversion: the average lives beside the weights it follows.
    ema = WeightsEma(weights, config.ema_decay) if config.ema_decay else None
    initial_share = config.ema_decay ** (epochs * steps_per_epoch)
    # (No steps at all, epochs 0, keep the initial weights on purpose: nothing to warn about.)
    if ema is not None and info.main and epochs > 0 and initial_share > EMA_INITIAL_SHARE_WARNING:
        # A short run with a long average: what is validated and saved is still largely the starting point.
        log.warning("ema_decay %g averages over about %d steps and this run has %d: the final average still "
                    "gives the initial weights %.0f%% of its weight", config.ema_decay,
                    round(1 / (1 - config.ema_decay)), epochs * steps_per_epoch, 100 * initial_share)

    def validate() -> tuple[float, dict[str, float]]:
        model.eval()
        # The job's predictor reads ``model``: with EMA on, it holds the average for the time of the validation.
        with _holding(weights, ema.tensors) if ema is not None else nullcontext():
            return evaluate(job.predictor(device), job.val, config.crop_border)

    def save_best(epoch: int, step: int, saved: Mapping[str, Any] | None = None) -> None:
        """best.pth from the current weights, or from ``saved`` (``best`` as a resume state holds it)."""
        def current() -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in weights.state_dict().items()}

        if saved is not None:
            best["weights"] = saved["weights"]
            if ema is not None:
                best["raw"] = saved["raw"]
        elif ema is not None:
            best["weights"], best["raw"] = ema.state(), current()
        else:
            best["weights"] = current()
        best["step"] = step
        extra = {**job.describe.get("extra", {}), "val_psnr": best["psnr"]}
        if ema is not None:  # only when on: a run without EMA describes itself as before EMA existed
            extra["ema_decay"] = config.ema_decay
        save_checkpoint(best_path, best["weights"], **{**job.describe, "extra": extra}, step=step, epoch=epoch,
                        provenance=provenance, raw_weights=best["raw"] if ema is not None else None)

    state = _load_resume(resume_path, identity, epochs) if resume_path is not None and info.main else None
    # Only rank 0 reads the resume state (nodes need not share a file system); the others receive it.
    state = distributed.broadcast_object(state, info)
    if state is not None:
        weights.load_state_dict(state["model"])
        if ema is not None:  # the identity includes ema_decay, so a state written with EMA on has "ema"
            ema.load(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if info.main:
            _set_rng_states(state["rng"])
        else:  # the saved RNG is rank 0's; other ranks must keep their own streams
            seed_everything(config.seed + info.rank + 1_000_003 * state["epoch"], device)
        start, step, best, history = state["epoch"], state["step"], dict(state["best"]), list(state["history"])
        best_per_image = dict(state["best_per_image"])
        log.info("resuming from %s after epoch %d (best %.4f dB at epoch %d)", resume_path, start, best["psnr"],
                 best["epoch"])
        if info.main:
            # out_dir may be a fresh staging folder: the best weights travel in the resume state and best.pth /
            # curve.csv are rewritten from there.
            save_best(best["epoch"], best["step"], best)
            _write_curve(curve_path, history)
    elif not info.main:
        start, step, history, best, best_per_image = 0, 0, [], {}, {}
    else:
        start, step = 0, 0
        psnr0, best_per_image = validate()
        best = {"psnr": psnr0, "epoch": 0}
        save_best(0, 0)
        history = [{"epoch": 0, "train_loss": None, "val_psnr": psnr0, "lr": config.lr, "seconds": 0.0,
                    "samples": 0, "hr_pixels": 0}]
        _write_curve(curve_path, history)
        log.info("epoch 0 (initial model): val PSNR-Y %.4f dB", psnr0)
        if log_metrics is not None:
            log_metrics({"val_psnr": psnr0}, 0)
    resumed_from = start
    # DDP broadcasts rank 0's weights when it wraps the model and averages gradients in backward().
    forward = (DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if info.enabled
               else model)
    if config.compile:
        forward = torch.compile(forward)

    for epoch in range(start + 1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, hr_pixels, last_lr = 0.0, 0, 0, optimizer.param_groups[0]["lr"]
        bar = tqdm(_loader(job.train, epoch, config.batch, config.seed, device, config.workers, info),
                   desc=f"epoch {epoch}/{epochs}", leave=False, disable=None if info.main else True,
                   dynamic_ncols=True)
        for batch in bar:
            batch = [t.to(device, non_blocking=True) for t in batch]
            loss = job.loss(forward, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(weights)
            last_lr = optimizer.param_groups[0]["lr"]
            if config.schedule == "cosine":
                scheduler.step()
            step += 1
            hr = batch[-1]
            loss_sum += loss.item() * hr.shape[0]
            seen += hr.shape[0]
            hr_pixels += hr.shape[0] * hr.shape[-2] * hr.shape[-1]
            bar.set_postfix(loss=f"{loss.item():.5f}", refresh=False)
        if config.schedule != "cosine":
            scheduler.step()
        seconds = time.perf_counter() - t0
        loss_sum, seen, hr_pixels = distributed.all_sum([loss_sum, seen, hr_pixels], info, device)
        train_loss = loss_sum / max(seen, 1)
        if not info.main:
            continue

        val_psnr, per_image = validate()
        if val_psnr > best["psnr"]:
            best = {"psnr": val_psnr, "epoch": epoch}
            best_per_image = per_image
            save_best(epoch, step)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_psnr": val_psnr, "lr": last_lr,
                        "seconds": seconds, "samples": int(seen), "hr_pixels": int(hr_pixels)})
        _write_curve(curve_path, history)
        if resume_path is not None:
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            resume = {"format": RESUME_FORMAT, "config": json.dumps(identity, sort_keys=True), "epoch": epoch,
                      "step": step, "model": {k: v.detach().cpu() for k, v in weights.state_dict().items()},
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "rng": _rng_states(), "best": best, "best_per_image": best_per_image, "history": history}
            if ema is not None:
                resume["ema"] = ema.state()
            torch.save(resume, resume_path.with_suffix(".pth.tmp"))
            resume_path.with_suffix(".pth.tmp").replace(resume_path)  # atomic: a kill mid-save keeps the last
        log.info("epoch %d/%d: train loss %.6f, val PSNR-Y %.4f dB (best %.4f @ %d), lr %.3g, %.1f s", epoch,
                 epochs, train_loss, val_psnr, best["psnr"], best["epoch"], last_lr, seconds)
        if log_metrics is not None:
            log_metrics({"train_loss": train_loss, "val_psnr": val_psnr, "lr": last_lr, "epoch_seconds": seconds},
                        epoch)

    if not info.main:
        return {"epochs": epochs, "steps": step, "world_size": info.world}
    trained = [h for h in history if h["epoch"] > 0]
    if trained and best["epoch"] == 0:
        log.warning("no epoch beat the initial model on val (%.4f dB); best.pth keeps the initial weights",
                    best["psnr"])
    summary = {
        "best_val_psnr": best["psnr"], "best_epoch": best["epoch"], "initial_val_psnr": history[0]["val_psnr"],
        "final_val_psnr": history[-1]["val_psnr"],
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
        "improved": best["epoch"] > 0, "epochs": history[-1]["epoch"], "steps": step,
        "world_size": info.world, "best_per_image": best_per_image, "timing": _timing(trained, resumed_from),
    }
    if ema is not None:  # only when on: without EMA the metrics stay those of runs from before EMA existed
        summary["ema_decay"] = config.ema_decay
    return summary
