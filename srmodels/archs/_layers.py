"""Layers shared by DAT, SwinIR and RRDBNet: upsampling heads, the residual conv, float32 CPU inference fast
paths (oneDNN linear layers with fused epilogues and direct convolutions, both on weights packed once per weight
version; Winograd 3x3 convolution), and our own versions of three small timm helpers.

timm is deliberately not a dependency: it imports torchvision, which has no CPU build on our machines.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction

import torch
from torch import nn


def to_2tuple(x):
    """(x, x) for a scalar, the iterable as a tuple otherwise."""
    if isinstance(x, Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


def _onednn_op(name: str):
    """torch.ops.mkldnn.<name>, or None on a torch build without it (the fast paths then step aside)."""
    return getattr(getattr(torch.ops, "mkldnn", None), name, None)


_LINEAR_POINTWISE = _onednn_op("_linear_pointwise")
_REORDER_LINEAR_WEIGHT = _onednn_op("_reorder_linear_weight")
_CONV_POINTWISE = _onednn_op("_convolution_pointwise")
_REORDER_CONV_WEIGHT = _onednn_op("_reorder_convolution_weight")
# Row count (linear) and image side (convolution) oneDNN is told to expect when it packs a weight. The packed
# values do not depend on them, only the kernel they prepare for: any linear hint from 64 rows up measured the
# same at 1k-10k rows (1 was slower), and a conv weight packed for 64x64 ran as fast at 17x23 and 120x84 as one
# packed for those sizes.
_PACK_ROWS_HINT = 4096
_PACK_SIDE_HINT = 64


class _Derived:
    """A tensor computed from a module's weight, valid while that weight is the same object, storage and version."""

    __slots__ = ("weight", "data_ptr", "version", "value")

    def __init__(self, weight: torch.Tensor, value: torch.Tensor) -> None:
        self.weight = weakref.ref(weight)
        self.data_ptr = weight.data_ptr()
        self.version = weight._version
        self.value = value

    def valid_for(self, weight: torch.Tensor) -> bool:
        return (self.weight() is weight and self.data_ptr == weight.data_ptr()
                and self.version == weight._version)


# Inference-only forms of weights (oneDNN-packed weights, Winograd-transformed kernels), per module and kind,
# dropped with the module. A weight replaced, reloaded or updated in place (optimizer step, load_state_dict:
# both bump its version) is transformed again on next use, so the cache never serves a stale weight. In-place
# writes through ``.data`` bypass the version counter (as they bypass autograd's checks); use torch.no_grad().
_DERIVED: weakref.WeakKeyDictionary[nn.Module, dict[str, _Derived]] = weakref.WeakKeyDictionary()


def derived_weight(module: nn.Module, kind: str, weight: torch.Tensor,
                   make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(weight)``, computed once per module, ``kind`` and weight version (inference paths only).

    Weights created under ``torch.inference_mode`` have no version counter, so theirs is computed on every call.
    """
    if weight.is_inference():
        return make(weight.detach())
    entries = _DERIVED.setdefault(module, {})
    entry = entries.get(kind)
    if entry is None or not entry.valid_for(weight):
        with torch.no_grad():
            entry = entries[kind] = _Derived(weight, make(weight.detach()))
    return entry.value


def _packed_weight(fc: nn.Linear) -> torch.Tensor:
    """fc.weight in oneDNN's blocked layout: the matmuls skip their per-call reorder and take a kernel prepared for
    it (SwinIR-M at 120x84: 3% less time per forward, bit-identical outputs)."""
    if _REORDER_LINEAR_WEIGHT is None:
        return fc.weight
    return derived_weight(fc, "onednn", fc.weight, lambda w: _REORDER_LINEAR_WEIGHT(w.contiguous(), _PACK_ROWS_HINT))


def _cpu_float32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where the fast paths below apply: training keeps autograd's ops, CUDA/bf16/autocast have their own
    kernels, and torch.compile traces the plain layers (it cannot trace the oneDNN ops)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _onednn_inference(x: torch.Tensor, fc: nn.Linear) -> bool:
    return _LINEAR_POINTWISE is not None and _cpu_float32_inference(x, fc.weight)


def linear(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """``fc(x)``; in float32 CPU inference one oneDNN matmul with the bias added as it writes the output
    (``addmm`` first copies the broadcast bias into the whole output, a full extra write pass)."""
    if _onednn_inference(x, fc):
        return _LINEAR_POINTWISE(x, _packed_weight(fc), fc.bias, "none", [], "")
    return fc(x)


def linear_add(x: torch.Tensor, fc: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``fc(x) + residual`` (residual shaped like the output); in float32 CPU inference the residual is added
    by the matmul as it writes the output."""
    if _onednn_inference(x, fc):
        return _LINEAR_POINTWISE.binary(x, residual, _packed_weight(fc), fc.bias, "add")
    return fc(x) + residual


def linear_gelu(x: torch.Tensor, fc: nn.Linear, act: nn.Module) -> torch.Tensor:
    """``act(fc(x))``; for float32 CPU inference with exact GELU, one oneDNN matmul with GELU applied as it
    writes the output (bit-identical here, and it spares a full read/write pass over the widest activation).

    Training, other devices/dtypes, autocast and other activations take the plain two-op path.
    """
    if _onednn_inference(x, fc) and type(act) is nn.GELU and act.approximate == "none":
        return _LINEAR_POINTWISE(x, _packed_weight(fc), fc.bias, "gelu", [], "none")
    return act(fc(x))


# Winograd F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): each
# 4x4 output tile comes from a 6x6 input tile with 36 multiplies per channel pair instead of 144. The transforms
# are Toom-Cook's at the points 0, 1, -1, 2, -1/2 and infinity; the textbook 0, +-1, +-2 set measured 2.5x the
# float32 error (4.5e-5 against 1.8e-5 on unit-variance 180-channel features; the direct convolution's is 8e-6).
_WINOGRAD_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-1, 2))
_WINOGRAD_M = 4  # output tile side; input tiles are m + 2
# Winograd pays off when both sides are wide (AVX2, 2 threads, against oneDNN's direct conv): 180->180 at 120x88
# takes about 0.6x the time, 64->256 0.7x, 180->64 0.9x; 64->64 is a wash and 32-wide outputs (RRDBNet's dense
# layers) are slower.
_WINOGRAD_MIN_CHANNELS = 64
_WINOGRAD_MIN_WIDEST = 128
# Tile rows per chunk are chosen so one chunk's transformed input (or product, if wider) stays near this size.
# It bounds the extra memory on large images; much smaller chunks (4 MB and below) measured slower, the batched
# GEMM getting too short.
_WINOGRAD_CHUNK_BYTES = 16 << 20


def toom_cook_matrices(m: int, r: int, points: Sequence[Fraction]) -> tuple[list[list[Fraction]], ...]:
    """Exact (A^T, G, B^T) of the 1-D minimal filtering algorithm F(m, r) at ``points`` (m + r - 2 finite points
    plus infinity): ``A^T [(G g) * (B^T d)]`` is the correlation of a length-(m + r - 1) signal d with filter g."""
    n = m + r - 1
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {list(points)}")

    def times_root(poly: list[Fraction], a: Fraction) -> list[Fraction]:  # poly(x) * (x - a), low order first
        return [shifted - a * same for shifted, same in zip([Fraction(0)] + poly, poly + [Fraction(0)])]

    a_t = [[p ** i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]
    g, b_t = [], []
    for j, a in enumerate(points):
        others = [p for k, p in enumerate(points) if k != j]
        norm = Fraction(1)
        poly = [Fraction(1)]
        for p in others:
            norm *= a - p
            poly = times_root(poly, p)
        g.append([a ** k / norm for k in range(r)])
        b_t.append(poly + [Fraction(0)] * (n - len(poly)))
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    poly = [Fraction(1)]
    for p in points:
        poly = times_root(poly, p)
    b_t.append(poly)
    return a_t, g, b_t


# Exact at import, as floats from then on (every entry is a short binary fraction except G's thirds/fifteenths).
_WINOGRAD_AT, _WINOGRAD_G, _WINOGRAD_BT = ([[float(v) for v in row] for row in mat]
                                           for mat in toom_cook_matrices(_WINOGRAD_M, 3, _WINOGRAD_POINTS))


def _as_tensor(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) kernel -> (36, Cin, Cout) transformed kernel G w G^T, its 6x6 positions in (x, y) order
    (the order :func:`winograd_conv3x3` transforms its input tiles into)."""
    g = _as_tensor(_WINOGRAD_G, weight)
    co, ci = weight.shape[:2]
    w = weight.detach().permute(3, 2, 1, 0).reshape(3, 3 * ci * co)
    u = torch.matmul(g, torch.matmul(g, w).view(6, 3, ci * co))  # both kernel axes, one after the other
    return u.view(36, ci, co)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     transformed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel, by Winograd F(4x4, 3x3); no autograd.

    6x6 input tiles (stride 4) are gathered from zero-padded channels-last rows, transformed along each axis by
    a small matmul, multiplied by the transformed kernel in one batched GEMM, and transformed back into 4x4
    output tiles. Tile rows go in chunks, so the extra memory stays a few chunk-sized buffers whatever the image
    size. Returns a channels-last tensor, equal to the direct convolution up to float rounding (about 2e-5 on
    unit-variance features, 2-3x the direct convolution's own float32 error). ``transformed`` is
    ``winograd_weight(weight)`` when the caller already has it.
    """
    n, c, h, w = x.shape
    co, m, t = weight.shape[0], _WINOGRAD_M, _WINOGRAD_M + 2
    u = winograd_weight(weight) if transformed is None else transformed
    b_t, a_t = _as_tensor(_WINOGRAD_BT, x), _as_tensor(_WINOGRAD_AT, x)
    th, tw = -(-h // m), -(-w // m)  # tiles; ragged edges get zero rows/columns, cropped at the end
    xh = x.permute(0, 2, 3, 1)
    out = x.new_empty(n, m * th, m * tw, co)
    rows = max(1, _WINOGRAD_CHUNK_BYTES // (t * t * n * tw * max(c, co) * x.element_size()))
    for r in range(0, th, rows):
        k = min(rows, th - r)
        # Input rows m*r - 1 .. m*(r+k) feed these tiles; rows outside the image are the zero padding.
        lo, hi = m * r - 1, min(m * (r + k) + 1, h)
        xp = x.new_zeros(n, m * k + 2, m * tw + 2, c)
        xp[:, max(lo, 0) - lo:hi - lo, 1:w + 1] = xh[:, max(lo, 0):hi]
        d = xp.unfold(1, t, m).unfold(2, t, m).permute(4, 5, 0, 1, 2, 3).contiguous()  # (6, 6, n, k, tw, c)
        # B^T d B, x axis then y axis. Each step is a batch of (6 x 6) @ (6 x tiles*c) products along the
        # middle axis, which ran twice as fast as one (6 x 6) @ (6 x 6*tiles*c) product along the outer axis; it
        # leaves the positions in (x, y) order, as winograd_weight orders the kernel.
        v = torch.matmul(b_t, torch.matmul(b_t, d.view(t, t, -1)).transpose(0, 1))
        prod = torch.bmm(v.view(t * t, n * k * tw, c), u)
        y = torch.matmul(a_t, torch.matmul(a_t, prod.view(t, t, -1)).transpose(0, 1))  # A^T prod A: (4, 4, tiles)
        tiles = y.view(m, m, n, k, tw, co).permute(2, 3, 0, 4, 1, 5)  # (n, k, 4, tw, 4, co)
        out[:, m * r:m * (r + k)].view(n, k, m, tw, m, co).copy_(tiles)
    if bias is not None:
        out += bias
    out = out[:, :h, :w].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last)


class DirectConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and ``state_dict``) whose float32 CPU inference is one oneDNN convolution
    with the weight packed once (see ``derived_weight``): equal to ``nn.Conv2d`` up to summation order
    (bit-identical on RRDBNet's channels-last activations here), 3% less time per RRDBNet forward at 64x64.
    Training, other devices or dtypes and autocast take ``nn.Conv2d``'s forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_CONV_POINTWISE is not None and _REORDER_CONV_WEIGHT is not None and x.dim() == 4
                and _cpu_float32_inference(x, self.weight) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)):
            geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            hint = [1, self.in_channels, _PACK_SIDE_HINT, _PACK_SIDE_HINT]
            weight = derived_weight(self, "onednn", self.weight,
                                    lambda w: _REORDER_CONV_WEIGHT(w.contiguous(), *geometry, hint))
            return _CONV_POINTWISE(x, weight, self.bias, *geometry, "none", [], "")
        return super().forward(x)


class Conv2d(DirectConv2d):
    """:class:`DirectConv2d` that runs wide 3x3 convolutions by Winograd F(4x4, 3x3) in float32 CPU inference,
    where that is faster than the direct convolution.

    Anything else (training, other devices or dtypes, autocast, other kernel shapes, narrow layers) is
    :class:`DirectConv2d`'s forward.
    """

    def _use_winograd(self, x: torch.Tensor) -> bool:
        return (_cpu_float32_inference(x, self.weight) and x.dim() == 4 and self.kernel_size == (3, 3)
                and self.stride == (1, 1) and self.padding == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros"
                and min(self.in_channels, self.out_channels) >= _WINOGRAD_MIN_CHANNELS
                and max(self.in_channels, self.out_channels) >= _WINOGRAD_MIN_WIDEST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_winograd(x):
            return winograd_conv3x3(x, self.weight, self.bias,
                                    derived_weight(self, "winograd", self.weight, winograd_weight))
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
                m += [Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            m += [Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
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
