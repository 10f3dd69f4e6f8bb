"""Layers shared by DAT and SwinIR: upsampling heads, the residual conv, float32 CPU inference fast paths
(oneDNN linear layers with fused epilogues, Winograd 3x3 convolution), and our own versions of three small timm
helpers.

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


def _cpu_float32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where the fast paths below apply: training keeps autograd's ops, and CUDA/bf16/autocast have their own
    kernels."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def _onednn_inference(x: torch.Tensor, fc: nn.Linear) -> bool:
    return _LINEAR_POINTWISE is not None and _cpu_float32_inference(x, fc.weight)


def linear(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """``fc(x)``; in float32 CPU inference one oneDNN matmul with the bias added as it writes the output
    (``addmm`` first copies the broadcast bias into the whole output, a full extra write pass)."""
    if _onednn_inference(x, fc):
        return _LINEAR_POINTWISE(x, fc.weight, fc.bias, "none", [], "")
    return fc(x)


def linear_add(x: torch.Tensor, fc: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``fc(x) + residual`` (residual shaped like the output); in float32 CPU inference the residual is added
    by the matmul as it writes the output."""
    if _onednn_inference(x, fc):
        return _LINEAR_POINTWISE.binary(x, residual, fc.weight, fc.bias, "add")
    return fc(x) + residual


def linear_gelu(x: torch.Tensor, fc: nn.Linear, act: nn.Module) -> torch.Tensor:
    """``act(fc(x))``; for float32 CPU inference with exact GELU, one oneDNN matmul with GELU applied as it
    writes the output (bit-identical here, and it spares a full read/write pass over the widest activation).

    Training, other devices/dtypes, autocast and other activations take the plain two-op path.
    """
    if _onednn_inference(x, fc) and type(act) is nn.GELU and act.approximate == "none":
        return _LINEAR_POINTWISE(x, fc.weight, fc.bias, "gelu", [], "none")
    return act(fc(x))


# Winograd F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): each
# 2x2 output tile comes from a 4x4 input tile with 16 multiplies per channel pair instead of 36.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Below this many input and output channels the transforms cost more than the multiplies they save (measured
# on AVX2: 180->180 takes about 0.75x the time of oneDNN's direct conv, 64->256 1.3x).
_WINOGRAD_MIN_CHANNELS = 128
# Tile rows per chunk are chosen so one chunk's transformed input stays near this size. It bounds the extra
# memory on large images; much smaller chunks (4 MB and below) measured slower, the batched GEMM getting too short.
_WINOGRAD_CHUNK_BYTES = 16 << 20


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) kernel -> (16, Cin, Cout) transformed kernel G w G^T."""
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    # One GEMM with kron(G, G): its entries (0, +-1/4, +-1/2, 1) make every product exact.
    co, ci = weight.shape[:2]
    u = torch.kron(g, g) @ weight.detach().transpose(0, 1).reshape(ci * co, 9).t()
    return u.view(16, ci, co)


def _input_transform(r0: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, r3: torch.Tensor,
                     out: torch.Tensor) -> None:
    """B^T d along one axis, B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]; writes out[0..3]."""
    torch.sub(r0, r2, out=out[0])
    torch.add(r1, r2, out=out[1])
    torch.sub(r2, r1, out=out[2])
    torch.sub(r1, r3, out=out[3])


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel, by Winograd F(2x2, 3x3); no autograd.

    Input tiles are transformed with strided adds on zero-padded channels-last rows, the 16 transformed planes
    are multiplied by the transformed kernel in one batched GEMM, and 2x2 outputs are written back interleaved.
    Tile rows go in chunks, so the extra memory stays a few chunk-sized buffers whatever the image size. Returns
    a channels-last tensor, equal to the direct convolution up to float rounding (about 1e-6 relative).
    """
    n, c, h, w = x.shape
    co = weight.shape[0]
    u = winograd_weight(weight)
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles; an odd edge gets a zero row/column, cropped at the end
    xh = x.permute(0, 2, 3, 1)
    out = x.new_empty(n, 2 * th, 2 * tw, co)
    rows = max(1, _WINOGRAD_CHUNK_BYTES // (16 * n * tw * max(c, co) * x.element_size()))
    for r in range(0, th, rows):
        k = min(rows, th - r)
        # Input rows 2r-1 .. 2(r+k) feed these tiles; rows outside the image are the zero padding.
        lo, hi = 2 * r - 1, min(2 * (r + k) + 1, h)
        xp = x.new_zeros(n, 2 * k + 2, 2 * tw + 2, c)
        xp[:, max(lo, 0) - lo:hi - lo, 1:w + 1] = xh[:, max(lo, 0):hi]
        t = x.new_empty(4, n, k, 2 * tw + 2, c)
        _input_transform(*(xp[:, i:i + 2 * k:2] for i in range(4)), t)
        v = x.new_empty(4, 4, n, k, tw, c)
        for a in range(4):
            _input_transform(*(t[a][:, :, j:j + 2 * tw:2] for j in range(4)), v[a])
        m = torch.bmm(v.view(16, -1, c), u).view(4, 4, n, k, tw, co)
        # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: first over tile rows, then over tile columns.
        s = x.new_empty(2, 4, n, k, tw, co)
        torch.add(m[0], m[1], out=s[0]).add_(m[2])
        torch.sub(m[1], m[2], out=s[1]).sub_(m[3])
        for i in range(2):
            block = out[:, 2 * r + i:2 * (r + k):2]
            torch.add(s[i, 0], s[i, 1], out=block[:, :, 0::2]).add_(s[i, 2])
            torch.sub(s[i, 1], s[i, 2], out=block[:, :, 1::2]).sub_(s[i, 3])
    if bias is not None:
        out += bias
    out = out[:, :h, :w].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and ``state_dict``) that runs wide 3x3 convolutions by Winograd
    F(2x2, 3x3) in float32 CPU inference, where that is faster than the direct convolution.

    Anything else (training, other devices or dtypes, autocast, other kernel shapes, narrow layers) is the
    plain ``nn.Conv2d`` forward.
    """

    def _use_winograd(self, x: torch.Tensor) -> bool:
        return (_cpu_float32_inference(x, self.weight) and x.dim() == 4 and self.kernel_size == (3, 3)
                and self.stride == (1, 1) and self.padding == (1, 1) and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and min(self.in_channels, self.out_channels) >= _WINOGRAD_MIN_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_winograd(x):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv before a residual add in DAT and SwinIR: '1conv' (3x3) or '3conv' (bottlenecked at dim // 4,
    fewer parameters than one full 3x3 conv)."""
    if resi_connection == "1conv":
        return Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(negative_slope=0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(negative_slope=0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


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
