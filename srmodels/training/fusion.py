"""Fusion-net training: what the weight nets of ``srmodels.models.fusion`` bring to the training loop
(``srmodels.training.fit``), and the references they have to beat.

Kept apart from ``srmodels.models.fusion``, which the test and score stages import to fuse: training code
changing does not invalidate them. The net is plain convolutions with no CPU fast paths of its own, so validation
runs it as it trains (in eval mode), as the test stage does.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from srmodels.data.datasets import FusionCrops, FusionImage, load_fusion_image
from srmodels.models.fusion import INITS, fuse, fusion_inputs, fusion_loss, start_at_anchor, start_at_member
from srmodels.training.loop import (Job, LogMetrics, Predict, TrainConfig, autocast, evaluate, files_fingerprint,
                                   fit, memory_format)

log = logging.getLogger(__name__)


def fused(net: Any, kind: str, outputs: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """The net's weighted sum of the members (B, 3N, H, W) -> (B, 3, H, W), float32."""
    device = outputs.device
    with autocast(device):
        weights = net(fusion_inputs(kind, outputs, lr).contiguous(memory_format=memory_format(device))).float()
    return fuse(outputs, weights)


def _outputs_predictor(pick: Any, scale: int) -> Predict:
    """Predicts a FusionImage by ``pick(members, lr)`` (no device: the references run on CPU)."""

    def predict(item: FusionImage) -> tuple[str, Any, torch.Tensor]:
        cands, lr, hr = load_fusion_image(item, scale)
        return item.stem, hr, pick(cands, lr)

    return predict


def fusion_job(net: nn.Module, kind: str, train: FusionCrops, val: Sequence[FusionImage], *,
               l1_weight: float = 0.8, mse_weight: float = 0.2, members: Sequence[str] | None = None,
               init: str = "random") -> Job:
    """Training of a fusion weight net: loss ``l1_weight * L1 + mse_weight * MSE`` of the fused crop vs HR.

    ``net`` is an ``AttentionWeightNet`` (kind 'pixel', sees the members) or an ``ImageWeightNet`` ('image',
    sees the LR image). ``members`` are the names recorded in best.pth (default: ``train.members``).
    """
    if kind not in ("pixel", "image"):
        raise ValueError(f"unknown fusion kind {kind!r}; valid: pixel, image")
    n, scale = train.num_members, train.scale
    members = list(members) if members is not None else list(train.members)
    if len(members) != n:
        raise ValueError(f"{len(members)} member names for {n} members")

    def loss(forward: Any, batch: list[torch.Tensor]) -> torch.Tensor:
        cands, lr, hr = batch
        return fusion_loss(fused(forward, kind, cands, lr), hr, l1_weight, mse_weight)

    def predictor(device: torch.device) -> Predict:
        return _outputs_predictor(lambda c, lr: fused(net, kind, c.to(device), lr.to(device)), scale)

    return Job(model=net, train=train, val=val, loss=loss, predictor=predictor,
               describe={"arch": f"fusion_{kind}", "kwargs": net.config(), "scale": scale,
                         "input_range": 1.0, "extra": {"members": members, "kind": kind, "init": init}},
               identity={"train": {"files": _files(train.images), "lr_patch": train.lr_patch,
                                   "crops_per_image": train.crops_per_image, "augment": train.augment},
                         "val": _files(val), "l1_weight": l1_weight, "mse_weight": mse_weight, "init": init,
                         "net": net.config()})


def _files(images: Sequence[FusionImage]) -> dict[str, Any]:
    """The images' names and a fingerprint of every file they read (the members' caches change on re-runs)."""
    return {"images": [i.stem for i in images],
            "files": files_fingerprint([p for i in images for p in (*i.outputs, i.hr, i.lr)])}


def train_fusion(net: nn.Module, train: FusionCrops, val: Sequence[FusionImage], config: TrainConfig,
                 out_dir: str | Path, *, kind: str, l1_weight: float = 0.8, mse_weight: float = 0.2,
                 members: Sequence[str] | None = None, init: str = "random", device: torch.device | str = "cpu",
                 provenance: dict[str, Any] | None = None, resume_path: str | Path | None = None,
                 log_metrics: LogMetrics | None = None) -> dict[str, Any]:
    """Train a fusion weight net on cached members (``fit`` of a ``fusion_job``), against its references.

    ``val`` is the validation split's images (``fusion_images`` over the val or val_se caches), never test.
    ``init``: ``random`` trains ``net`` as given (team 27); ``best_member`` first sets it to select the member
    that scores best on ``val`` (``srmodels.models.fusion.start_at_member``), so the best epoch cannot fall
    below it.

    Returns:
        best_val_psnr, best_epoch, initial_val_psnr, final_val_psnr, member_val_psnr (each member alone),
        mean_val_psnr (plain average of the members), gain_over_best_member, epochs, steps and
        best_per_image; ``timing`` holds the wall-clock figures (see ``fit``).
    """
    if init not in INITS:
        raise ValueError(f"unknown fusion init {init!r}; valid: {', '.join(INITS)}")
    if net.head_kind == "residual" and init != "best_member":
        raise ValueError("the residual head starts at its anchor, the best validation member (init best_member)")
    members = list(members) if members is not None else list(train.members)
    n, scale = train.num_members, train.scale
    # References the net has to beat: each member alone and the plain average (pure functions of the caches).
    member_psnr = {m: evaluate(_outputs_predictor(lambda c, _lr, i=i: c[:, 3 * i:3 * i + 3], scale), val,
                               config.crop_border)[0] for i, m in enumerate(members)}
    mean_psnr = evaluate(_outputs_predictor(lambda c, _lr: c.view(1, n, 3, *c.shape[-2:]).mean(1), scale),
                         val, config.crop_border)[0]
    best_member = max(member_psnr.values())
    if init == "best_member":
        start = members.index(max(member_psnr, key=member_psnr.__getitem__))  # the first of equals
        if net.head_kind == "residual":
            start_at_anchor(net, start)
        else:
            start_at_member(net, start)
        log.info("fusion starts at its best validation member, %s (%.4f dB)", members[start], best_member)
    job = fusion_job(net, kind, train, val, l1_weight=l1_weight, mse_weight=mse_weight, members=members, init=init)
    metrics = fit(job, config, out_dir, device=device, provenance=provenance, resume_path=resume_path,
                  log_metrics=log_metrics)
    log.info("val PSNR-Y: fusion %.4f dB; members %s; their average %.4f dB", metrics["best_val_psnr"],
             ", ".join(f"{m} {p:.4f}" for m, p in member_psnr.items()), mean_psnr)
    if metrics["best_val_psnr"] <= best_member:
        log.warning("fusion (%.4f dB) does not beat its best member (%.4f dB) on val", metrics["best_val_psnr"],
                    best_member)
    return {"init": init, "head": net.head_kind,
            **{k: metrics[k] for k in ("best_val_psnr", "best_epoch", "initial_val_psnr", "final_val_psnr")},
            "member_val_psnr": member_psnr, "mean_val_psnr": mean_psnr,
            "gain_over_best_member": metrics["best_val_psnr"] - best_member,
            **{k: metrics[k] for k in ("epochs", "steps", "best_per_image", "timing")}}
