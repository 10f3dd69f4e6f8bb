"""Layers shared by DAT and SwinIR: upsampling heads, and our own versions of three small timm helpers.

timm is deliberately not a dependency: it imports torchvision, which has no CPU build on our machines.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def to_2tuple(x):
    """(x, x) for a scalar, the iterable as a tuple otherwise."""
    if isinstance(x, Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


def _onednn_linear_pointwise():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


_LINEAR_POINTWISE = _onednn_linear_pointwise()


def linear_gelu(x: torch.Tensor, linear: nn.Linear, act: nn.Module) -> torch.Tensor:
    """``act(linear(x))``; for float32 CPU inference with exact GELU, one oneDNN matmul with GELU applied as it
    writes the output (bit-identical here, and it spares a full read/write pass over the widest activation).

    Training, other devices/dtypes, autocast and other activations take the plain two-op path.
    """
    if (_LINEAR_POINTWISE is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and type(act) is nn.GELU and act.approximate == "none"
            and linear.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return _LINEAR_POINTWISE(x, linear.weight, linear.bias, "gelu", [], "none")
    return act(linear(x))


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample: zero whole residual branches, rescale the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    """Fill with N(mean, std) truncated to [a, b] by inverse-CDF sampling."""
    def cdf(v: float) -> float:
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0)).add_(mean)
    tensor.clamp_(min=a, max=b)
    return tensor


class Upsample(nn.Sequential):
    """Conv + PixelShuffle stages: log2(scale) x2 stages for powers of two, one x3 stage for 3 (DAT, SwinIR)."""

    def __init__(self, scale: int, num_feat: int) -> None:
        m: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                m += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            m += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"scale {scale} is not supported; supported scales: 2^n and 3")
        super().__init__(*m)


class UpsampleOneStep(nn.Sequential):
    """One conv straight to scale**2 * out channels and one PixelShuffle (the lightweight heads)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int,
                 input_resolution: tuple[int, int] | None = None) -> None:
        super().__init__(nn.Conv2d(num_feat, scale ** 2 * num_out_ch, 3, 1, 1), nn.PixelShuffle(scale))
        self.num_feat = num_feat
        self.input_resolution = input_resolution
