"""Backbones with uniform I/O, and building them from variant names or checkpoints.

Everything outside ``srmodels.archs`` talks to a backbone through ``SRModel``: RGB in [0, 1] in, RGB on the
[0, 1] scale out (not clamped). A network trained on another pixel scale (RFDN_AIM.pth: 0-255) records that scale
as ``input_range`` and is rescaled here, never by the caller.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srmodels import archs
from srmodels.models.checkpoint import CheckpointError, checkpoint_meta, load_into, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)


def scale_of(arch: str, kwargs: dict[str, Any]) -> int:
    """Upscaling factor implied by an architecture's constructor arguments."""
    if arch == "rfdn":
        return 4  # the official RFDN ignores its upscale argument
    return int(kwargs.get("scale", kwargs.get("upscale", 4)))


class SRModel(nn.Module):
    """A raw backbone plus the pixel scale its weights were trained on."""

    def __init__(self, net: nn.Module, arch: str, kwargs: dict[str, Any], input_range: float = 1.0,
                 variant: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.kwargs = kwargs
        self.variant = variant
        self.input_range = float(input_range)
        self.scale = scale_of(arch, kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_range == 1.0:
            return self.net(x)
        return self.net(x * self.input_range) / self.input_range

    def describe(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model."""
        return {"arch": self.arch, "variant": self.variant, "kwargs": self.kwargs, "scale": self.scale,
                "input_range": self.input_range}


def _raw_arch(net: nn.Module) -> str | None:
    """The ``ARCHS`` name of a raw architecture module, or None for anything else."""
    module, _, name = type(net).__module__.rpartition(".")
    return name if module == archs.__name__ and archs.ARCHS.get(name) == type(net).__name__ else None


def min_input_size(model: Any) -> int:
    """The smallest LR height and width a backbone processes (1: any size).

    ``model``: a variant name, an ``SRModel`` (also accelerated or wrapped by ``torch.compile``) or a raw
    architecture module; anything else (a plain callable, the fusion net) gives 1. Under the x8 self-ensemble
    and tiling the limit applies to each side of every forward: a (tile + 2 * overlap) window, or the image.
    """
    if isinstance(model, str):
        arch, kwargs, _ = archs.variant_spec(model)
        return archs.min_input_size(arch, kwargs)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, SRModel):
        return archs.min_input_size(model.arch, model.kwargs)
    arch = _raw_arch(model)
    if arch is None:
        return 1
    return archs.min_input_size(arch, {"window_size": model.window_size} if hasattr(model, "window_size") else {})


def check_input_size(model: Any, height: int, width: int, name: str | Path) -> None:
    """An ``ImageError`` naming ``name`` (the image) and the limit when ``model`` cannot process an LR input of
    ``height`` x ``width`` (``min_input_size``): raised before the forward, which would fail with a traceback."""
    from srmodels.data.images import ImageError  # local: images imports cv2, which model users need not load

    smallest = min_input_size(model)
    if min(height, width) < smallest:
        model = getattr(model, "_orig_mod", model)
        label = model if isinstance(model, str) else (
            (model.variant or model.arch) if isinstance(model, SRModel) else type(model).__name__)
        raise ImageError(f"{name}: LR image {width}x{height} is too small for {label}, which needs at least "
                         f"{smallest} px on each side")


def build_model(variant: str, overrides: dict[str, Any] | None = None) -> SRModel:
    """A freshly initialised model of a named variant (``srmodels.archs.variants()``)."""
    arch, kwargs, input_range = archs.variant_spec(variant)
    kwargs.update(overrides or {})
    return SRModel(archs.arch_class(arch)(**kwargs), arch, kwargs, input_range, variant)


def infer_variant(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Variants whose state_dict has exactly these keys and shapes (built on the meta device: no memory)."""
    matches = []
    for name, (arch, kwargs, _) in archs.variants().items():
        with torch.device("meta"):
            expected = archs.arch_class(arch)(**kwargs).state_dict()
        if expected.keys() == state_dict.keys() and all(expected[k].shape == state_dict[k].shape for k in expected):
            matches.append(name)
    return matches


def model_from_description(meta: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str) -> SRModel:
    """The model a description (:meth:`SRModel.describe`) and its weights give, in eval mode; ``source`` names
    them in errors."""
    if meta.get("arch") not in archs.ARCHS:
        raise CheckpointError(f"{source}: describes a {meta.get('arch')!r} model, not one of the backbones "
                              f"{', '.join(archs.ARCHS)}")
    net = archs.arch_class(meta["arch"])(**meta["kwargs"])
    model = SRModel(net, meta["arch"], meta["kwargs"], meta["input_range"], meta.get("variant"))
    load_into(model.net, state_dict, strict=True, source=source)
    return model.eval()


def load_model(weights: str | Path, variant: str | None = None, input_range: float | None = None) -> SRModel:
    """Rebuild a model from a checkpoint: ours describe themselves (``.pth`` or ``.safetensors`` with our
    metadata); released ones (any wrapping :mod:`srmodels.models.checkpoint` reads) need or imply a variant.

    For released weights the variant's input range applies (``rfdn`` -> 0-255, the scale of RFDN_AIM.pth)
    unless ``input_range`` is given.
    """
    raw = read_checkpoint(weights)
    state_dict = unwrap_state_dict(raw, source=str(weights))
    meta = checkpoint_meta(raw)
    if meta is not None:
        if variant is not None and variant not in (meta.get("variant"), meta.get("arch")):
            log.warning("%s describes itself as %s (%s); ignoring --arch %s", weights, meta.get("variant"),
                        meta.get("arch"), variant)
        return model_from_description(meta, state_dict, str(weights))
    if variant is None:
        found = infer_variant(state_dict)
        if len(found) != 1:
            raise CheckpointError(
                f"{weights}: a released checkpoint without a description; pass --arch "
                f"({'it fits: ' + ', '.join(found) if found else 'it fits none of the known variants'})")
        variant = found[0]
        log.info("%s: recognised as variant %s", weights, variant)
    arch, kwargs, default_range = archs.variant_spec(variant)
    net = archs.arch_class(arch)(**kwargs)
    model = SRModel(net, arch, kwargs, default_range if input_range is None else input_range, variant)
    load_into(model.net, state_dict, strict=True, source=str(weights))
    return model.eval()
