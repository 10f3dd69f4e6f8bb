"""Backbone architectures and the literal table of named variants.

Each architecture lives in its own module and keeps the official constructor keyword names and
``state_dict`` keys, so released checkpoints load strictly without remapping. ``create(name)``
builds a named variant; ``VARIANTS`` is the whole table (no registry magic, no file scanning).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .dat import DAT
from .rfdn import RFDN
from .rrdbnet import RRDBNet
from .swinir import SwinIR

__all__ = ["DAT", "SwinIR", "RFDN", "RRDBNet", "ARCHS", "VARIANTS", "create", "variant_spec"]

# Architecture name -> class. Checkpoints record one of these names.
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "dat": DAT,
    "swinir": SwinIR,
    "rfdn": RFDN,
    "rrdbnet": RRDBNet,
}

_DAT_BASE = dict(upscale=4, in_chans=3, img_size=64, img_range=1.0, embed_dim=180, num_heads=[6] * 6,
                 depth=[6] * 6, expansion_factor=4, resi_connection="1conv", split_size=[8, 32])
_SWINIR_M = dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0, depths=[6] * 6,
                 embed_dim=180, num_heads=[6] * 6, mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv")

# Variant name -> (arch, constructor kwargs, input range the released weights expect).
# input_range is the pixel scale the network computes in: 1.0 for [0,1], 255.0 for RFDN_AIM.pth.
VARIANTS: dict[str, tuple[str, dict[str, Any], float]] = {
    # DAT (Chen et al., ICCV 2023), options/Test/test_DAT*_x4.yml
    "dat": ("dat", _DAT_BASE, 1.0),
    "dat_s": ("dat", {**_DAT_BASE, "split_size": [8, 16], "expansion_factor": 2}, 1.0),
    "dat_2": ("dat", {**_DAT_BASE, "split_size": [8, 32], "expansion_factor": 2}, 1.0),
    "dat_light": ("dat", dict(upscale=4, in_chans=3, img_size=64, img_range=1.0, depth=[18], embed_dim=60,
                              num_heads=[6], expansion_factor=2, resi_connection="3conv", split_size=[8, 32],
                              upsampler="pixelshuffledirect"), 1.0),
    # SwinIR-M classical x4: DF2K s64w8 and DIV2K s48w8 releases (team 27 used img_size 48)
    "swinir_m": ("swinir", _SWINIR_M, 1.0),
    "swinir_m_s48": ("swinir", {**_SWINIR_M, "img_size": 48}, 1.0),
    # RFDN (AIM 2020 winner); RFDN_AIM.pth was trained on 0-255 inputs
    "rfdn": ("rfdn", dict(in_nc=3, nf=50, num_modules=4, out_nc=3, upscale=4), 255.0),
    # RRDBNet: ESRGAN / Real-ESRGAN generator
    "rrdbnet": ("rrdbnet", dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32), 1.0),
    # Small variants: the default CPU pipeline profile and tests
    # (the lightweight releases' pixelshuffledirect upsampler: a 64-channel x4 upsampler would cost 5x the body)
    "dat_small": ("dat", dict(upscale=4, in_chans=3, img_size=32, img_range=1.0, split_size=[4, 8], depth=[2, 2],
                              embed_dim=32, num_heads=[2, 2], expansion_factor=2, resi_connection="1conv",
                              upsampler="pixelshuffledirect"), 1.0),
    "swinir_small": ("swinir", dict(upscale=4, in_chans=3, img_size=32, window_size=8, img_range=1.0, depths=[2, 2],
                                    embed_dim=32, num_heads=[2, 2], mlp_ratio=2, upsampler="pixelshuffledirect",
                                    resi_connection="1conv"), 1.0),
    "rfdn_small": ("rfdn", dict(in_nc=3, nf=16, num_modules=4, out_nc=3, upscale=4), 1.0),
    "rrdbnet_small": ("rrdbnet", dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=16, num_block=2,
                                      num_grow_ch=8), 1.0),
    # Tiny variants: unit tests (these are the public fixtures' configurations)
    "dat_tiny": ("dat", dict(upscale=4, in_chans=3, img_size=16, img_range=1.0, split_size=[4, 8], depth=[2, 2],
                             embed_dim=64, num_heads=[4, 4], expansion_factor=2, resi_connection="1conv"), 1.0),
    "swinir_tiny": ("swinir", dict(upscale=4, in_chans=3, img_size=16, window_size=8, img_range=1.0, depths=[2, 2],
                                   embed_dim=60, num_heads=[6, 6], mlp_ratio=2, upsampler="pixelshuffle",
                                   resi_connection="1conv"), 1.0),
    "rfdn_tiny": ("rfdn", dict(in_nc=3, nf=16, num_modules=4, out_nc=3, upscale=4), 1.0),
    "rrdbnet_tiny": ("rrdbnet", dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=16, num_block=2,
                                     num_grow_ch=8), 1.0),
}


def variant_spec(name: str) -> tuple[str, dict[str, Any], float]:
    """(arch, kwargs copy, input_range) of a named variant; KeyError lists the valid names."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; valid: {', '.join(sorted(VARIANTS))}")
    arch, kwargs, input_range = VARIANTS[name]
    return arch, {k: (list(v) if isinstance(v, list) else v) for k, v in kwargs.items()}, input_range


def create(name: str, **overrides: Any) -> nn.Module:
    """Build the raw network of a named variant (official forward semantics), kwargs overridable."""
    arch, kwargs, _ = variant_spec(name)
    kwargs.update(overrides)
    return ARCHS[arch](**kwargs)
