"""What a model costs: parameters, and multiply-accumulates (MACs) per output pixel.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward of a zero input (batch 1):
convolutions, linear layers and matrix products, attention included (MACs = counted flops / 2). CPU attention
through ``F.scaled_dot_product_attention`` runs an op the counter does not know
(``_scaled_dot_product_flash_attention_for_cpu``); it is counted here with the counter's own formula for the other
attention kernels (QK^T and AV). Not counted, by the counter's convention: biases, normalisation, activations,
softmax, pooling, interpolation and pixel shuffles -- elementwise work, small beside the products.

Windowed attention costs depend a little on the image size (padding to whole windows), so a count is for one
LR size (64 x 64 by default, the size the released models were trained on) and is divided by the output pixels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["num_params", "count_macs", "macs_per_output_pixel", "fusion_macs_per_output_pixel",
           "SELF_ENSEMBLE_PASSES"]

SELF_ENSEMBLE_PASSES = 8  # the x8 self-ensemble: 8 flipped / transposed forwards, then their mean

_aten = torch.ops.aten
# Attention kernels the counter has no formula for, with the formula of their siblings.


def _cpu_sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


_cpu_sdpa_flops._get_raw = True  # type: ignore[attr-defined]  # takes tensors, as FlopCounterMode passes them
_EXTRA_FORMULAS = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def num_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once; buffers such as position indices not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of one forward of ``module`` on ``inputs`` (no gradients; train/eval mode restored afterwards)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            module(*inputs)
    finally:
        module.train(was_training)
    flops = counter.get_total_flops()
    return flops // 2


def macs_per_output_pixel(model: nn.Module, lr_size: tuple[int, int] = (64, 64), scale: int = 4, *,
                          self_ensemble: bool = False) -> float:
    """MACs per output (HR) pixel of an SR model: one forward on a zero LR batch (1, 3, h, w), divided by
    ``h * w * scale^2``.

    ``self_ensemble``: the x8 self-ensemble, 8 forwards (same count at a square size) plus their mean, counted as
    8 multiply-adds per output value (3 x 8 per pixel).
    """
    h, w = lr_size
    param = next(iter(model.parameters()), None)
    x = torch.zeros(1, 3, h, w, dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    per_pixel = count_macs(model, x) / (h * w * scale * scale)
    if self_ensemble:
        return SELF_ENSEMBLE_PASSES * per_pixel + 3 * SELF_ENSEMBLE_PASSES
    return per_pixel


def fusion_macs_per_output_pixel(net: nn.Module, kind: str, out_size: tuple[int, int] = (256, 256), scale: int = 4,
                                 *, combine_macs: int | None = None) -> float:
    """MACs per output pixel of a fusion, members excluded: the weight net's forward plus the weighted sum.

    ``kind`` 'pixel': the net sees the N members at output size, (1, 3N, H, W); 'image': it sees the LR
    image, (1, 3, H / scale, W / scale). The weighted sum ``sum_i w_i c_i`` costs ``combine_macs`` per output
    pixel, by default 3N (one multiply-add per member and channel); a residual head
    ``anchor + sum_i w_i (c_i - anchor)`` can pass its own count. Add the members' own costs
    (:func:`macs_per_output_pixel`) for the whole pipeline.
    """
    n = int(getattr(net, "num_members"))
    h, w = out_size
    if kind == "pixel":
        x = torch.zeros(1, 3 * n, h, w)
    elif kind == "image":
        if h % scale or w % scale:
            raise ValueError(f"output size {out_size} is not a multiple of the scale {scale}")
        x = torch.zeros(1, 3, h // scale, w // scale)
    else:
        raise ValueError(f"unknown fusion kind {kind!r} (pixel or image)")
    combine = 3 * n if combine_macs is None else combine_macs
    return count_macs(net, x) / (h * w) + combine
