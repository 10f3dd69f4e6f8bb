"""Training loops as plain functions: backbone fine-tuning (``finetune``) and the fusion net (``train_fusion``).

Both validate after every epoch on the validation split only (PSNR on Y, border cropped, the SR output quantised
to uint8 as when it is saved), keep the best epoch as a self-describing ``best.pth`` and write ``curve.csv``.
Epoch 0 is the model before any training, so an initial (e.g. pretrained) model that training only makes worse is
reported, and kept, as the best.

Reproducibility: ``seed_everything`` seeds Python, NumPy and torch and, on CPU, asks for deterministic kernels.
Data order and augmentation are pure functions of (seed, epoch, index) (see ``srmodels.datasets``), so CPU runs
with the same seed and thread count give bit-identical weights, and a resumed ``finetune`` run gives the weights
of an uninterrupted one. CUDA runs are seeded the same way but not bit-exact (atomics in cuDNN/cuBLAS kernels).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import distributed
from .checkpoint import save_checkpoint
from .datasets import FusionCrops, FusionImage, load_fusion_image, read_pair
from .fusion import fuse, fusion_inputs, fusion_loss
from .images import to_tensor, to_uint8
from .inference import upscale
from .metrics import calculate_psnr
from .runtime import seed_everything, set_threads

if TYPE_CHECKING:  # the fusion stage trains without importing the backbones
    from .model import SRModel

log = logging.getLogger(__name__)

LogMetrics = Callable[[dict[str, float], int], None]
SCHEDULES = ("cosine", "multistep", "constant")
RESUME_FORMAT = "srmodels-resume-v1"
# curve.csv holds only what the seed determines; wall-clock seconds go to the run record (see ``timing``).
CURVE_FIELDS = ("epoch", "train_loss", "val_psnr", "lr")
COSINE_ETA_MIN = 1e-7  # floor of the per-iteration cosine schedule (BasicSR's value)


# --------------------------------------------------------------------------------------------------- setup

def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a disabled context elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


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


# ---------------------------------------------------------------------------------------------- evaluation

def _eval_item(item: Any, scale: int) -> tuple[str, np.ndarray, tuple[torch.Tensor, ...]]:
    """(name, HR uint8, model inputs) of a validation item: an (hr, lr) path pair or a FusionImage."""
    if isinstance(item, FusionImage):
        cands, lr, hr = load_fusion_image(item, scale)
        return item.stem, hr, (cands, lr)
    hr_path, lr_path = item
    hr, lr = read_pair(Path(hr_path), Path(lr_path), scale)
    return Path(hr_path).stem, hr, (to_tensor(lr),)


def evaluate(model_fn: Callable[..., torch.Tensor], pairs: Sequence[Any], scale: int, crop_border: int, *,
             device: torch.device | str = "cpu") -> tuple[float, dict[str, float]]:
    """Mean and per-image PSNR on Y of ``model_fn``'s outputs, quantised to uint8 as when saved.

    ``pairs`` holds (hr_path, lr_path) tuples, for which ``model_fn(lr)`` is called with the (1, 3, h, w) LR in
    [0, 1], or ``FusionImage`` items, for which ``model_fn(candidates, lr)`` is called with the (1, 3N, H, W)
    cached candidates. Inputs are moved to ``device``; the output must be (1, 3, H, W) on the [0, 1] scale.
    """
    device = torch.device(device)
    per_image: dict[str, float] = {}
    for item in pairs:
        name, hr, inputs = _eval_item(item, scale)
        with torch.no_grad():
            sr = model_fn(*(t.to(device) for t in inputs))
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


def _load_resume(path: Path, config: Mapping[str, Any], epochs: int) -> dict[str, Any] | None:
    """The resume state in ``path`` if it was written by a run with this config, else None (with a warning)."""
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
    if _canonical(old) != _canonical(config):
        changed = sorted(k for k in set(old) | set(config) if _canonical(old.get(k)) != _canonical(config.get(k)))
        log.warning("%s: written with another configuration (%s differ); starting fresh", path, ", ".join(changed))
        return None
    if state["epoch"] > epochs:
        log.warning("%s: already at epoch %d, beyond epochs=%d; starting fresh", path, state["epoch"], epochs)
        return None
    return state


def _make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, milestones: Sequence[int],
                    gamma: float) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "cosine":  # stepped every iteration
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1),
                                                          eta_min=COSINE_ETA_MIN)
    if schedule == "multistep":  # stepped every epoch
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if schedule == "constant":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[], gamma=1.0)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------------------ backbones

def finetune(model: SRModel, train: Dataset, val_pairs: Sequence[tuple[Path, Path]], *, epochs: int, batch: int,
             lr: float, schedule: str, milestones: Sequence[int] = (), gamma: float = 0.5,
             device: torch.device | str = "cpu", seed: int = 0, out_dir: str | Path, crop_border: int,
             provenance: dict[str, Any] | None = None, resume_path: str | Path | None = None,
             log_metrics: LogMetrics | None = None, workers: int = 0, threads: int | None = None,
             val_tile: int | None = None, compile: bool = False) -> dict[str, Any]:
    """Fine-tune a backbone with L1 loss and Adam; returns summary metrics.

    Args:
        model: the backbone (pretrained or fresh); left holding the last epoch's weights.
        train: a ``PairedPatches`` (anything with ``set_epoch`` and (lr, hr) items).
        val_pairs: (hr_path, lr_path) full images of the validation split.
        schedule: 'cosine' (per iteration, to 1e-7 at the end), 'multistep' (per epoch, x ``gamma`` at each of
            ``milestones``) or 'constant'.
        out_dir: receives best.pth (self-describing, highest val PSNR; epoch 0 = the initial model) and
            curve.csv.
        resume_path: where the state needed to continue after the last completed epoch is written after every
            epoch (None: nowhere, no resuming). A run finds it there and continues when it was written with the
            same configuration (model, initial weights, data, optimiser and schedule settings, threads, CPU
            instruction-set pin); otherwise it starts fresh with a warning. ``epochs`` is part of the
            configuration only for the cosine schedule, whose shape depends on it, so a constant or multistep
            run can be extended. Keep it outside the stage's outputs: it is work in progress, not a result.
        log_metrics: called as ``log_metrics(metrics, epoch)`` after every epoch (epoch 0 included).
        workers: DataLoader worker processes (items do not depend on it).
        threads: CPU intra-op threads (None: leave torch's setting).
        val_tile: LR tile size for validation forwards (None: whole images).
        compile: ``torch.compile`` the training forward (fixed patch shapes, so one compilation); validation
            sees whole images of varying sizes and stays eager.

    Data-parallel (DDP) when called in every process of an initialised process group (``srmodels.distributed``):
    ``batch`` is then the global batch and must divide by the world size; rank 0 alone validates, writes
    out_dir and calls ``log_metrics``. Each rank is seeded with ``seed + rank`` (stochastic layers such as
    DropPath differ per rank; data order and augmentation do not depend on the rank). On CUDA, BatchNorm layers
    become SyncBatchNorm so that statistics span the global batch.

    Returns:
        best_val_psnr, best_epoch, initial_val_psnr, final_val_psnr, final_train_loss, improved (whether any
        epoch beat the initial model), epochs, steps, world_size and best_per_image: all functions of the
        seed and the data. ``timing`` holds what is not: resumed_from_epoch, train_seconds (training only, all
        sessions), samples_per_second (all ranks) and epoch_seconds. Ranks other than 0 return only epochs,
        steps and world_size.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if epochs < 0 or batch < 1:
        raise ValueError(f"epochs must be >= 0 and batch >= 1, got {epochs}, {batch}")
    device = torch.device(device)
    info = distributed.current()
    if batch % info.world:
        raise ValueError(f"the global batch ({batch}) must divide by the number of processes ({info.world})")
    set_threads(threads)
    seed_everything(seed + info.rank, device)
    out_dir = Path(out_dir)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    best_path, curve_path = out_dir / "best.pth", out_dir / "curve.csv"
    resume_path = Path(resume_path) if resume_path is not None else None
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format

    steps_per_epoch = len(train) // batch if _drop_last(len(train), batch) else 1
    config = {
        "model": model.describe(), "init_weights": _state_fingerprint(model.net), "batch": batch, "lr": lr,
        "schedule": schedule, "epochs": epochs if schedule == "cosine" else None,
        "milestones": list(milestones) if schedule == "multistep" else None,
        "gamma": gamma if schedule == "multistep" else None, "seed": seed, "crop_border": crop_border,
        "train": {"type": type(train).__name__, "items": len(train),
                  **{k: getattr(train, k, None) for k in ("lr_patch", "scale", "augment")},
                  "files": hashlib.sha256("\n".join(str(p[0].name) for p in getattr(train, "pairs", []))
                                          .encode()).hexdigest()[:16]},
        "val": [Path(h).name for h, _ in val_pairs],
        # Numerics differ with the thread count and the kernels' instruction set: never mix them in one run.
        "threads": torch.get_num_threads(), "cpu_isa": os.environ.get("SRMODELS_CPU_ISA", "native"),
    }
    model.to(device=device, memory_format=fmt)
    if info.enabled and cuda:
        model.net = nn.SyncBatchNorm.convert_sync_batchnorm(model.net)  # same state_dict keys as BatchNorm
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    scheduler = _make_scheduler(optimizer, schedule, epochs * steps_per_epoch, milestones, gamma)

    def sr_fn(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            return upscale(model, x.contiguous(memory_format=fmt), model.scale, tile=val_tile).float()

    def validate() -> tuple[float, dict[str, float]]:
        model.eval()
        return evaluate(sr_fn, val_pairs, model.scale, crop_border, device=device)

    def save_best(epoch: int, step: int, weights: dict[str, torch.Tensor] | None = None) -> None:
        best["weights"] = weights or {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
        best["step"] = step
        save_checkpoint(best_path, best["weights"], **model.describe(), step=step, epoch=epoch,
                        provenance=provenance, extra={"val_psnr": best["psnr"]})

    state = _load_resume(resume_path, config, epochs) if resume_path is not None and info.main else None
    if state is not None and "weights" not in state["best"]:
        log.warning("%s predates best weights in resume files; starting fresh", resume_path)
        state = None
    # Only rank 0 reads out_dir (nodes need not share a file system); the others receive its state.
    state = distributed.broadcast_object(state, info)
    if state is not None:
        model.net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if info.main:
            _set_rng_states(state["rng"])
        else:  # the saved RNG is rank 0's; other ranks must keep their own streams
            seed_everything(seed + info.rank + 1_000_003 * state["epoch"], device)
        start, step, best, history = state["epoch"], state["step"], dict(state["best"]), list(state["history"])
        best_per_image = dict(state["best_per_image"])
        log.info("resuming from %s after epoch %d (best %.4f dB at epoch %d)", resume_path, start, best["psnr"],
                 best["epoch"])
        if info.main:
            # out_dir may be a fresh staging folder: the best weights travel in the resume state and best.pth /
            # curve.csv are rewritten from there.
            save_best(best["epoch"], best.get("step", 0), best["weights"])
            _write_curve(curve_path, history)
    elif not info.main:
        start, step, history, best, best_per_image = 0, 0, [], {}, {}
    else:
        start, step, history = 0, 0, []
        psnr0, best_per_image = validate()
        best = {"psnr": psnr0, "epoch": 0}
        save_best(0, 0)
        history.append({"epoch": 0, "train_loss": None, "val_psnr": psnr0, "lr": lr, "seconds": 0.0})
        _write_curve(curve_path, history)
        log.info("epoch 0 (initial model): val PSNR-Y %.4f dB", psnr0)
        if log_metrics is not None:
            log_metrics({"val_psnr": psnr0}, 0)
    resumed_from = start
    # DDP broadcasts rank 0's weights when it wraps the model and averages gradients in backward().
    forward = (DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if info.enabled
               else model)
    if compile:
        forward = torch.compile(forward)

    for epoch in range(start + 1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, last_lr = 0.0, 0, optimizer.param_groups[0]["lr"]
        bar = tqdm(_loader(train, epoch, batch, seed, device, workers, info), desc=f"epoch {epoch}/{epochs}",
                   leave=False, disable=None if info.main else True, dynamic_ncols=True)
        for lr_img, hr_img in bar:
            lr_img = lr_img.to(device, non_blocking=True).contiguous(memory_format=fmt)
            hr_img = hr_img.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with _autocast(device):
                out = forward(lr_img)
            loss = F.l1_loss(out.float(), hr_img)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_lr = optimizer.param_groups[0]["lr"]
            if schedule == "cosine":
                scheduler.step()
            step += 1
            loss_sum += loss.item() * lr_img.shape[0]
            seen += lr_img.shape[0]
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if schedule != "cosine":
            scheduler.step()
        seconds = time.perf_counter() - t0
        loss_sum, seen = distributed.all_sum([loss_sum, seen], info, device)
        train_loss = loss_sum / max(seen, 1)
        if not info.main:
            continue

        val_psnr, per_image = validate()
        if val_psnr > best["psnr"]:
            best = {"psnr": val_psnr, "epoch": epoch}
            best_per_image = per_image
            save_best(epoch, step)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_psnr": val_psnr, "lr": last_lr,
                        "seconds": seconds})
        _write_curve(curve_path, history)
        if resume_path is not None:
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"format": RESUME_FORMAT, "config": json.dumps(config, sort_keys=True), "epoch": epoch,
                        "step": step, "model": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": _rng_states(), "best": best, "best_per_image": best_per_image,
                        "history": history}, resume_path.with_suffix(".pth.tmp"))
            resume_path.with_suffix(".pth.tmp").replace(resume_path)  # atomic: a kill mid-save keeps the last
        log.info("epoch %d/%d: train L1 %.5f, val PSNR-Y %.4f dB (best %.4f @ %d), lr %.3g, %.1f s", epoch, epochs,
                 train_loss, val_psnr, best["psnr"], best["epoch"], last_lr, seconds)
        if log_metrics is not None:
            log_metrics({"train_loss": train_loss, "val_psnr": val_psnr, "lr": last_lr, "epoch_seconds": seconds},
                        epoch)

    if not info.main:
        return {"epochs": epochs, "steps": step, "world_size": info.world}
    trained = [h for h in history if h["epoch"] > 0]
    train_seconds = float(sum(h["seconds"] for h in trained))
    if trained and best["epoch"] == 0:
        log.warning("no epoch beat the initial model on val (%.4f dB); best.pth keeps the initial weights",
                    best["psnr"])
    return {
        "best_val_psnr": best["psnr"], "best_epoch": best["epoch"], "initial_val_psnr": history[0]["val_psnr"],
        "final_val_psnr": history[-1]["val_psnr"],
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
        "improved": best["epoch"] > 0, "epochs": history[-1]["epoch"], "steps": step,
        "world_size": info.world, "best_per_image": best_per_image,
        "timing": {"resumed_from_epoch": resumed_from, "train_seconds": train_seconds,
                   "samples_per_second": len(train) * len(trained) / train_seconds if train_seconds > 0 else None,
                   "epoch_seconds": [h["seconds"] for h in trained]},
    }


# ------------------------------------------------------------------------------------------------- fusion

def train_fusion(net: nn.Module, train: FusionCrops, val: Sequence[FusionImage], *, kind: str, epochs: int,
                 batch: int, lr: float, l1_weight: float = 0.8, mse_weight: float = 0.2,
                 device: torch.device | str = "cpu", seed: int = 0, out_dir: str | Path, crop_border: int,
                 provenance: dict[str, Any] | None = None, members: Sequence[str] | None = None,
                 log_metrics: LogMetrics | None = None, workers: int = 0,
                 threads: int | None = None, compile: bool = False) -> dict[str, Any]:
    """Train a fusion weight net on cached candidates; loss ``l1_weight * L1 + mse_weight * MSE`` of fuse vs HR.

    Args:
        net: an ``AttentionWeightNet`` (kind 'pixel', sees the candidates) or ``ImageWeightNet`` ('image', sees
            the LR image); left holding the last epoch's weights.
        train: ``FusionCrops`` over the fusion training split.
        val: the validation split's images (``fusion_images`` over the val or val_se caches), never test.
        members: member names recorded in best.pth (default: ``train.members``).
        out_dir: receives best.pth (``arch='fusion_' + kind``, kwargs ``num_candidates``, extra members/kind) and
            curve.csv.
        compile: ``torch.compile`` the net for training steps (validation stays eager).

    Returns:
        best_val_psnr, best_epoch, final_val_psnr, member_val_psnr (each candidate alone), mean_val_psnr (plain
        average of the candidates), gain_over_best_member, epochs, steps and best_per_image; ``timing`` holds
        the wall-clock figures (train_seconds, samples_per_second, hr_megapixels_per_second, epoch_seconds).
    """
    if kind not in ("pixel", "image"):
        raise ValueError(f"unknown fusion kind {kind!r}; valid: pixel, image")
    device = torch.device(device)
    set_threads(threads)
    seed_everything(seed, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, curve_path = out_dir / "best.pth", out_dir / "curve.csv"
    n = train.num_candidates
    members = list(members) if members is not None else list(train.members)
    if len(members) != n:
        raise ValueError(f"{len(members)} member names for {n} candidates")
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    net.to(device=device, memory_format=fmt)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scale = train.scale

    train_net = torch.compile(net) if compile else net

    def fused_fn(cands: torch.Tensor, lr_img: torch.Tensor, module: nn.Module = net) -> torch.Tensor:
        with _autocast(device):
            weights = module(fusion_inputs(kind, cands, lr_img).contiguous(memory_format=fmt)).float()
        return fuse(cands, weights)

    def validate() -> tuple[float, dict[str, float]]:
        net.eval()
        return evaluate(fused_fn, val, scale, crop_border, device=device)

    # References the net has to beat: each member alone and the plain average.
    member_psnr = {m: evaluate(lambda c, _lr, i=i: c[:, 3 * i:3 * i + 3], val, scale, crop_border)[0]
                   for i, m in enumerate(members)}
    mean_psnr = evaluate(lambda c, _lr: c.view(1, n, 3, *c.shape[-2:]).mean(1), val, scale, crop_border)[0]
    log.info("val PSNR-Y of the members: %s; their average %.4f dB",
             ", ".join(f"{m} {p:.4f}" for m, p in member_psnr.items()), mean_psnr)

    def save_best(epoch: int, step: int) -> None:
        save_checkpoint(best_path, net.state_dict(), arch=f"fusion_{kind}", kwargs={"num_candidates": n},
                        scale=scale, input_range=1.0, step=step, epoch=epoch, provenance=provenance,
                        extra={"members": members, "kind": kind, "val_psnr": best["psnr"]})

    psnr0, best_per_image = validate()
    best = {"psnr": psnr0, "epoch": 0}
    save_best(0, 0)
    history: list[dict[str, Any]] = [{"epoch": 0, "train_loss": None, "val_psnr": psnr0, "lr": lr, "seconds": 0.0}]
    _write_curve(curve_path, history)
    if log_metrics is not None:
        log_metrics({"val_psnr": psnr0}, 0)

    step, samples, hr_pixels = 0, 0, 0
    for epoch in range(1, epochs + 1):
        net.train()
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(_loader(train, epoch, batch, seed, device, workers), desc=f"fusion {epoch}/{epochs}",
                   leave=False, disable=None, dynamic_ncols=True)
        for cands, lr_img, hr_img in bar:
            cands = cands.to(device, non_blocking=True)
            lr_img = lr_img.to(device, non_blocking=True)
            hr_img = hr_img.to(device, non_blocking=True)
            out = fused_fn(cands, lr_img, train_net)
            loss = fusion_loss(out, hr_img, l1_weight, mse_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * hr_img.shape[0]
            seen += hr_img.shape[0]
            hr_pixels += hr_img.shape[0] * hr_img.shape[-2] * hr_img.shape[-1]
            bar.set_postfix(loss=f"{loss.item():.5f}", refresh=False)
        seconds = time.perf_counter() - t0
        samples += seen
        train_loss = loss_sum / max(seen, 1)
        val_psnr, per_image = validate()
        if val_psnr > best["psnr"]:
            best = {"psnr": val_psnr, "epoch": epoch}
            best_per_image = per_image
            save_best(epoch, step)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_psnr": val_psnr, "lr": lr,
                        "seconds": seconds})
        _write_curve(curve_path, history)
        log.info("fusion epoch %d/%d: train loss %.6f, val PSNR-Y %.4f dB (best %.4f @ %d), %.1f s", epoch, epochs,
                 train_loss, val_psnr, best["psnr"], best["epoch"], seconds)
        if log_metrics is not None:
            log_metrics({"train_loss": train_loss, "val_psnr": val_psnr, "epoch_seconds": seconds}, epoch)

    train_seconds = float(sum(h["seconds"] for h in history))
    best_member = max(member_psnr.values())
    if best["psnr"] <= best_member:
        log.warning("fusion (%.4f dB) does not beat its best member (%.4f dB) on val", best["psnr"], best_member)
    return {
        "best_val_psnr": best["psnr"], "best_epoch": best["epoch"], "initial_val_psnr": psnr0,
        "final_val_psnr": history[-1]["val_psnr"], "member_val_psnr": member_psnr, "mean_val_psnr": mean_psnr,
        "gain_over_best_member": best["psnr"] - best_member, "epochs": epochs, "steps": step,
        "best_per_image": best_per_image,
        "timing": {"train_seconds": train_seconds,
                   "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
                   "hr_megapixels_per_second": hr_pixels / 1e6 / train_seconds if train_seconds > 0 else None,
                   "epoch_seconds": [h["seconds"] for h in history[1:]]},
    }
