"""The one training loop, ``fit``: backbone fine-tuning (``srmodels.training.finetune``) and the fusion net
(``srmodels.training.fusion``) both run it.

What the loop does the same for every job: validate after every epoch on the validation split only (PSNR on Y,
border cropped, the output quantised to uint8 as when it is saved), epoch 0 included, so an initial (e.g.
pretrained) model that training only makes worse is reported, and kept, as the best; keep the best epoch as a
self-describing ``best.pth``; write ``curve.csv``; step the LR schedule; resume exactly; run data-parallel.
What differs between jobs is a ``Job``: the module, its data, its loss, how it predicts a validation image, and
what its checkpoint says about it. The numbers that choose a run are a ``TrainConfig``.

``fit`` reads top to bottom: set up (``_setup``), resume or start at epoch 0 (``load_or_start``), then for each
epoch train (``train_epoch``), validate, keep the best, rewrite curve.csv, save the resume state (``save_state``)
and log. EMA and DDP are objects that the loop calls the same way whether they are on or off
(``srmodels.training.ema``, ``srmodels.training.distributed``).

EMA (``TrainConfig.ema_decay`` > 0): an exponential moving average of the weights, updated after every optimizer
step as ``ema = decay * ema + (1 - decay) * weight`` (KAIR's and BasicSR's formula, no warm-up and no bias
correction) from the initial weights: the pretrained ones when fine-tuning, so epoch 0 validates the same model
with or without EMA. Floating-point parameters are averaged; buffers (BatchNorm statistics and counters) are
copied from the trained weights. Validation, model selection, ``curve.csv`` and the metrics are then the EMA's,
best.pth holds the EMA weights (``state_dict`` and ``params_ema``) and the raw ones of the same step (``params``),
and the resume state holds the EMA, so a resumed run still equals an uninterrupted one. Decay 0 is off: nothing
is averaged, and no metric, checkpoint key, meta field, resume-state entry or resume identity mentions EMA.

Reproducibility: ``seed_everything`` seeds Python, NumPy and torch and, on CPU, asks for deterministic kernels.
Data order and augmentation are pure functions of (seed, epoch, index) (see ``srmodels.data.datasets``), so CPU
runs with the same seed and thread count give bit-identical weights, and a resumed run gives the weights of an
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from srmodels.core import layout
from srmodels.core.errors import UserError
from srmodels.core.files import atomic
from srmodels.core.runtime import seed_everything, set_threads
from srmodels.data.images import to_uint8
from srmodels.metrics.psnr_ssim import calculate_psnr
from srmodels.models.checkpoint import save_checkpoint, save_torch
from srmodels.training import distributed
from srmodels.training.ema import Ema, weights_ema

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
            dist: distributed.Dist = distributed.SINGLE) -> DataLoader:
    """This epoch's DataLoader: the order is a permutation drawn from (seed, epoch), so it does not depend on
    how many epochs ran before in this process (resume) nor on the workers.

    Under DDP ``batch`` is the global batch: every rank draws the same permutation and takes its share of it
    (``Dist.shard``: items r, r+N, r+2N, ...) in batches of B/N. Global step s therefore trains on exactly the
    items order[s*B:(s+1)*B], the batch one process with batch B would see.
    """
    dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    order = dist.shard(np.random.default_rng((seed, epoch)).permutation(len(dataset)).tolist())
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)  # only seeds the workers' own RNGs
    return DataLoader(dataset, batch_size=batch // dist.world, sampler=order, num_workers=workers,
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
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_FIELDS})


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
    if not config.ema_decay:  # off: no ema_decay key, as in the identity of a run without the setting
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

@dataclass
class Run:
    """What ``fit`` sets up once and every part of the loop reads."""

    job: Job
    config: TrainConfig
    device: torch.device
    dist: distributed.Dist       # this process's place in the process group (``SINGLE``: no DDP)
    weights: nn.Module           # what best.pth and the resume state hold: ``job.weights`` or else ``job.model``
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Ema                     # ``NoEma`` when ``config.ema_decay`` is 0
    identity: dict[str, Any]     # what a resume state must have been written with (``_resume_identity``)
    out_dir: Path
    provenance: dict[str, Any] | None
    log_metrics: LogMetrics


@dataclass
class Progress:
    """Where a run stands after its last completed epoch: what the resume state holds besides the weights, the
    optimizer, the schedule and the RNG. Ranks other than 0 keep only ``step``."""

    epoch: int = 0
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)  # psnr, epoch, weights (with EMA on: raw), step
    best_per_image: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch, epoch 0 first


@dataclass(frozen=True)
class EpochStats:
    """One epoch of training, summed over the ranks."""

    loss: float      # mean training loss per item
    lr: float        # the learning rate of the epoch's last step
    seconds: float
    samples: int
    hr_pixels: int
    steps: int


def _no_metrics(metrics: dict[str, float], epoch: int) -> None:
    """``log_metrics`` when none is given."""


def _setup(job: Job, config: TrainConfig, out_dir: Path, device: torch.device, provenance: dict[str, Any] | None,
           log_metrics: LogMetrics | None) -> Run:
    """Check the batch against the world size, fix threads and seeds, then put the model on ``device`` and build
    Adam, the LR schedule and the EMA."""
    dist = distributed.current()
    if config.batch % dist.world:
        raise ConfigError(f"the global batch ({config.batch}) must divide by the number of processes "
                          f"({dist.world})")
    set_threads(config.threads)
    seed_everything(dist.seed(config.seed), device)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    weights = job.weights if job.weights is not None else job.model
    steps = config.epochs * _steps_per_epoch(len(job.train), config.batch)
    identity = _resume_identity(job, config, weights)
    job.model.to(device=device, memory_format=memory_format(device))
    dist.sync_batchnorm(job.model, device)
    optimizer = torch.optim.Adam(job.model.parameters(), lr=config.lr, betas=config.betas)
    scheduler = _make_scheduler(optimizer, config, steps)
    # Built after the move and the SyncBatchNorm conversion: the average lives beside the weights it follows.
    ema = weights_ema(weights, config.ema_decay)
    if dist.main:
        _warn_if_average_outlasts_run(config.ema_decay, steps)
    return Run(job, config, device, dist, weights, optimizer, scheduler, ema, identity, out_dir, provenance,
               log_metrics or _no_metrics)


def _steps_per_epoch(items: int, batch: int) -> int:
    return items // batch if _drop_last(items, batch) else 1


def _warn_if_average_outlasts_run(decay: float, steps: int) -> None:
    """A short run with a long average: what is validated and saved is still largely the starting point. (No
    steps at all, epochs 0, keep the initial weights on purpose: nothing to warn about.)"""
    initial_share = decay ** steps  # 0 when EMA is off
    if steps > 0 and initial_share > EMA_INITIAL_SHARE_WARNING:
        log.warning("ema_decay %g averages over about %d steps and this run has %d: the final average still "
                    "gives the initial weights %.0f%% of its weight", decay, round(1 / (1 - decay)), steps,
                    100 * initial_share)


def validate(run: Run) -> tuple[float, dict[str, float]]:
    """Mean and per-image validation PSNR of the weights the run selects on: the EMA's when on."""
    run.job.model.eval()
    # The job's predictor reads ``job.model``: with EMA on, it holds the average for the time of the validation.
    with run.ema.applied(run.weights):
        return evaluate(run.job.predictor(run.device), run.job.val, run.config.crop_border)


def _best(run: Run, psnr: float, epoch: int, step: int) -> dict[str, Any]:
    """The record of a best epoch: its PSNR, epoch and step, and CPU copies of the weights to save now."""
    return {"psnr": psnr, "epoch": epoch, **run.ema.saved(run.weights), "step": step}


def _save_best(run: Run, best: Mapping[str, Any]) -> None:
    """best.pth from a record of ``_best``: self-describing, with the average and the raw weights when EMA is on."""
    extra = {**run.job.describe.get("extra", {}), "val_psnr": best["psnr"], **run.ema.describe()}
    save_checkpoint(run.out_dir / layout.BEST, best["weights"], **{**run.job.describe, "extra": extra},
                    step=best["step"], epoch=best["epoch"], provenance=run.provenance, raw_weights=best.get("raw"))


def load_or_start(run: Run, resume_path: Path | None) -> Progress:
    """Continue after the epoch of the resume state in ``resume_path`` if it was written with this job and these
    settings (``_load_resume``); otherwise start: validate the initial weights as epoch 0.

    Only rank 0 reads the resume state (nodes need not share a file system); the other ranks receive it. Rank 0
    writes best.pth and curve.csv either way: out_dir may be a fresh staging folder, and the best weights travel
    in the resume state.
    """
    state = None
    if resume_path is not None and run.dist.main:
        state = _load_resume(resume_path, run.identity, run.config.epochs)
    state = run.dist.broadcast(state)
    if state is None:
        return _start(run) if run.dist.main else Progress()
    run.weights.load_state_dict(state["model"])
    run.ema.restore(state)  # the identity includes ema_decay, so a state written with EMA on has its average
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.dist.main:
        _set_rng_states(state["rng"])
    else:  # the saved RNG is rank 0's; other ranks must keep their own streams
        seed_everything(run.dist.seed(run.config.seed, resumed_after=state["epoch"]), run.device)
    progress = Progress(state["epoch"], state["step"], dict(state["best"]), dict(state["best_per_image"]),
                        list(state["history"]))
    log.info("resuming from %s after epoch %d (best %.4f dB at epoch %d)", resume_path, progress.epoch,
             progress.best["psnr"], progress.best["epoch"])
    if run.dist.main:
        _save_best(run, progress.best)
        _write_curve(run.out_dir / layout.CURVE, progress.history)
    return progress


def _start(run: Run) -> Progress:
    """Epoch 0: the initial weights, validated, are the best so far."""
    psnr, per_image = validate(run)
    progress = Progress(best=_best(run, psnr, 0, 0), best_per_image=per_image)
    _save_best(run, progress.best)
    progress.history.append({"epoch": 0, "train_loss": None, "val_psnr": psnr, "lr": run.config.lr,
                             "seconds": 0.0, "samples": 0, "hr_pixels": 0})
    _write_curve(run.out_dir / layout.CURVE, progress.history)
    log.info("epoch 0 (initial model): val PSNR-Y %.4f dB", psnr)
    run.log_metrics({"val_psnr": psnr}, 0)
    return progress


def save_state(path: Path, run: Run, progress: Progress) -> None:
    """The resume state after ``progress.epoch``, written atomically: a kill mid-save keeps the previous one."""
    state = {"format": RESUME_FORMAT, "config": json.dumps(run.identity, sort_keys=True), "epoch": progress.epoch,
             "step": progress.step, "model": {k: v.detach().cpu() for k, v in run.weights.state_dict().items()},
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": _rng_states(),
             "best": progress.best, "best_per_image": progress.best_per_image, "history": progress.history,
             **run.ema.resume_entries()}
    save_torch(path, state)


def _training_forward(run: Run) -> Callable[..., torch.Tensor]:
    """What ``job.loss`` calls: the model, wrapped for DDP (``Dist.wrap``), compiled with ``config.compile``."""
    forward = run.dist.wrap(run.job.model, run.device)
    return torch.compile(forward) if run.config.compile else forward


def train_epoch(run: Run, forward: Callable[..., torch.Tensor], epoch: int) -> EpochStats:
    """One pass over this epoch's batches: per batch an optimizer step, an EMA update and (cosine) a schedule
    step; the other schedules step once at the end."""
    config, optimizer = run.config, run.optimizer
    run.job.model.train()
    t0 = time.perf_counter()
    loss_sum, seen, hr_pixels, steps, last_lr = 0.0, 0, 0, 0, optimizer.param_groups[0]["lr"]
    bar = tqdm(_loader(run.job.train, epoch, config.batch, config.seed, run.device, config.workers, run.dist),
               desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None if run.dist.main else True,
               dynamic_ncols=True)
    for batch in bar:
        batch = [t.to(run.device, non_blocking=True) for t in batch]
        loss = run.job.loss(forward, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.ema.update(run.weights)
        last_lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        if config.schedule == "cosine":
            run.scheduler.step()
        steps += 1
        hr = batch[-1]
        loss_sum += loss.item() * hr.shape[0]
        seen += hr.shape[0]
        hr_pixels += hr.shape[0] * hr.shape[-2] * hr.shape[-1]
        bar.set_postfix(loss=f"{loss.item():.5f}", refresh=False)
    if config.schedule != "cosine":
        run.scheduler.step()
    seconds = time.perf_counter() - t0
    loss_sum, seen, hr_pixels = run.dist.all_sum([loss_sum, seen, hr_pixels], run.device)
    return EpochStats(loss=loss_sum / max(seen, 1), lr=last_lr, seconds=seconds, samples=int(seen),
                      hr_pixels=int(hr_pixels), steps=steps)


def _log_epoch(run: Run, row: Mapping[str, Any], best: Mapping[str, Any]) -> None:
    log.info("epoch %d/%d: train loss %.6f, val PSNR-Y %.4f dB (best %.4f @ %d), lr %.3g, %.1f s", row["epoch"],
             run.config.epochs, row["train_loss"], row["val_psnr"], best["psnr"], best["epoch"], row["lr"],
             row["seconds"])
    run.log_metrics({"train_loss": row["train_loss"], "val_psnr": row["val_psnr"], "lr": row["lr"],
                     "epoch_seconds": row["seconds"]}, row["epoch"])


def _summary(run: Run, progress: Progress, resumed_from: int) -> dict[str, Any]:
    """What ``fit`` returns (see there)."""
    if not run.dist.main:
        return {"epochs": run.config.epochs, "steps": progress.step, "world_size": run.dist.world}
    best, history = progress.best, progress.history
    trained = [h for h in history if h["epoch"] > 0]
    if trained and best["epoch"] == 0:
        log.warning("no epoch beat the initial model on val (%.4f dB); best.pth keeps the initial weights",
                    best["psnr"])
    return {
        "best_val_psnr": best["psnr"], "best_epoch": best["epoch"], "initial_val_psnr": history[0]["val_psnr"],
        "final_val_psnr": history[-1]["val_psnr"],
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
        "improved": best["epoch"] > 0, "epochs": history[-1]["epoch"], "steps": progress.step,
        "world_size": run.dist.world, "best_per_image": progress.best_per_image,
        "timing": _timing(trained, resumed_from), **run.ema.describe(),
    }


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
    and the metrics returned are those of the weights' EMA (``srmodels.training.ema``); best.pth holds the EMA
    weights as ``state_dict`` and ``params_ema`` and the raw ones as ``params``.

    Data-parallel (DDP) when called in every process of an initialised process group
    (``srmodels.training.distributed``): ``config.batch`` is then the global batch and must divide by the world
    size; rank 0 alone validates, writes out_dir and calls ``log_metrics``. Each rank is seeded with
    ``seed + rank`` (stochastic layers such as DropPath differ per rank; data order and augmentation do not depend
    on the rank). On CUDA, BatchNorm layers become SyncBatchNorm so that statistics span the global batch. The
    model is left holding the last epoch's weights (the raw ones when EMA is on).

    Returns:
        best_val_psnr, best_epoch, initial_val_psnr, final_val_psnr, final_train_loss, improved (whether any
        epoch beat the initial model), epochs, steps, world_size, best_per_image and, with EMA on,
        ema_decay: all functions of the seed and the data. ``timing`` holds what is not: resumed_from_epoch,
        train_seconds (training only, all sessions), samples_per_second and hr_megapixels_per_second (all
        ranks) and epoch_seconds. Ranks other than 0 return only epochs, steps and world_size.
    """
    run = _setup(job, config, Path(out_dir), torch.device(device), provenance, log_metrics)
    resume_path = Path(resume_path) if resume_path is not None else None
    progress = load_or_start(run, resume_path)
    resumed_from = progress.epoch
    forward = _training_forward(run)
    for epoch in range(resumed_from + 1, config.epochs + 1):
        stats = train_epoch(run, forward, epoch)
        progress.step += stats.steps
        if not run.dist.main:
            continue  # rank 0 alone validates, writes and logs
        val_psnr, per_image = validate(run)
        if val_psnr > progress.best["psnr"]:
            progress.best, progress.best_per_image = _best(run, val_psnr, epoch, progress.step), per_image
            _save_best(run, progress.best)
        progress.epoch = epoch
        progress.history.append({"epoch": epoch, "train_loss": stats.loss, "val_psnr": val_psnr, "lr": stats.lr,
                                 "seconds": stats.seconds, "samples": stats.samples, "hr_pixels": stats.hr_pixels})
        _write_curve(run.out_dir / layout.CURVE, progress.history)
        if resume_path is not None:
            save_state(resume_path, run, progress)
        _log_epoch(run, progress.history[-1], progress.best)
    return _summary(run, progress, resumed_from)
