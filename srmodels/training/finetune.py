"""Backbone fine-tuning: L1 loss on paired patches, validated on whole images as the cache stage runs them.

What a backbone brings to the training loop (``srmodels.training.fit``); the fusion net's counterpart is
``srmodels.training.fusion``, which the backbone stages neither import nor depend on.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from srmodels.models.accelerate import accelerate
from srmodels.data.datasets import PairedPatches, read_pair
from srmodels.data.images import to_tensor
from srmodels.models.inference import upscale
from srmodels.models.model import SRModel, check_input_size, min_input_size
from srmodels.training.loop import (ConfigError, Job, Predict, TrainConfig, autocast, files_fingerprint, fit,
                                   memory_format)

# Adam's betas for the backbones (BasicSR's SR recipes; torch's default second moment is 0.999).
BETAS = (0.9, 0.99)


def backbone_predictor(model: SRModel, device: torch.device | str = "cpu", tile: int | None = None) -> Predict:
    """Predicts a validation (hr_path, lr_path) pair with ``model`` as inference runs it.

    Validation scores the accelerated inference model (``srmodels.models.accelerate``), the one the cache stage
    runs, built on a copy: the trained module keeps autograd's plain layers. ``tile``: LR tile size (None: whole
    images).
    """
    device = torch.device(device)
    net = accelerate(copy.deepcopy(model).eval())
    fmt = memory_format(device)

    def predict(item: tuple[Path, Path]) -> tuple[str, Any, torch.Tensor]:
        hr_path, lr_path = map(Path, item)
        hr, lr = read_pair(hr_path, lr_path, model.scale)
        check_input_size(model, lr.shape[0], lr.shape[1], lr_path)  # one line, not the forward's traceback
        with autocast(device):
            sr = upscale(net, to_tensor(lr).to(device).contiguous(memory_format=fmt), model.scale, tile=tile)
        return hr_path.stem, hr, sr.float()

    return predict


def backbone_job(model: SRModel, train: PairedPatches, val_pairs: Sequence[tuple[Path, Path]],
                 val_tile: int | None = None) -> Job:
    """Fine-tuning of ``model`` on ``train``'s (lr, hr) patches, selected on the (hr_path, lr_path) pairs."""
    smallest = min_input_size(model)
    if train.lr_patch < smallest:  # the crops go through the network whole
        raise ConfigError(f"lr_patch: {train.lr_patch} px crops are smaller than {model.variant or model.arch} "
                          f"accepts (at least {smallest} px on each side)")

    def loss(forward: Any, batch: list[torch.Tensor]) -> torch.Tensor:
        lr, hr = (t.contiguous(memory_format=memory_format(t.device)) for t in batch)
        with autocast(lr.device):
            out = forward(lr)
        return F.l1_loss(out.float(), hr)

    return Job(model=model, weights=model.net, train=train, val=val_pairs, loss=loss,
               predictor=lambda device: backbone_predictor(model, device, val_tile), describe=model.describe(),
               identity={"train": {"items": len(train), "lr_patch": train.lr_patch, "scale": train.scale,
                                   "augment": train.augment,
                                   "files": files_fingerprint([p for pair in train.pairs for p in pair])},
                         "val": {"images": [Path(hr).name for hr, _ in val_pairs],
                                 "files": files_fingerprint([p for pair in val_pairs for p in pair])}})


def finetune(model: SRModel, train: PairedPatches, val_pairs: Sequence[tuple[Path, Path]], config: TrainConfig,
             out_dir: str | Path, *, device: torch.device | str = "cpu", provenance: dict[str, Any] | None = None,
             resume_path: str | Path | None = None, log_metrics: Any = None,
             val_tile: int | None = None) -> dict[str, Any]:
    """Fine-tune a backbone (``fit`` of a ``backbone_job``); ``model`` is left holding the last epoch's weights.

    best.pth rebuilds the backbone alone (``srmodels.models.model.load_model``); see ``fit`` for the rest and the
    metrics returned. Use ``BETAS`` in ``config`` for the backbones' usual optimiser.
    """
    return fit(backbone_job(model, train, val_pairs, val_tile), config, out_dir, device=device,
               provenance=provenance, resume_path=resume_path, log_metrics=log_metrics)
