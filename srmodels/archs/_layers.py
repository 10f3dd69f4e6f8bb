"""Layers shared by DAT, SwinIR and RRDBNet: shifted-window masks and token orders (one ``WindowPlan`` per
forward), upsampling heads, the residual conv, and our own versions of three small timm helpers.

Everything here is a plain PyTorch port. The CPU inference kernels (packed oneDNN weights, Winograd) live in
``srmodels.models.accelerate`` and are applied to a built model explicitly.

timm is deliberately not a dependency: it imports torchvision, which has no CPU build on our machines.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn


def to_2tuple(x):
    """(x, x) for a scalar, the iterable as a tuple otherwise."""
    if isinstance(x, Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


_MASK_VALUE = -100.0  # Swin's additive mask for token pairs from different regions of a rolled window


def shift_window_mask(x_size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                      device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Additive (num_windows, N, N) mask of (wh, ww) windows over an H x W map cyclically shifted by -shift.

    H and W are multiples of the window sides. After the shift, the last window row / column holds pixels from
    opposite borders: each axis splits into three bands ([0, n - win), [n - win, n - shift), [n - shift, n)),
    and token pairs from different bands get -100, others 0 (Swin's scheme). A zero shift gives an all-zero mask.
    """
    h, w = x_size

    def bands(n: int, win: int, s: int) -> torch.Tensor:
        band = torch.zeros(n, dtype=torch.long, device=device)
        if s > 0:
            band[n - win:] = 1
            band[n - s:] = 2
        return band

    region = bands(h, window[0], shift[0])[:, None] * 3 + bands(w, window[1], shift[1])[None, :]
    region = region.view(h // window[0], window[0], w // window[1], window[1]).transpose(1, 2)
    region = region.reshape(-1, window[0] * window[1])
    different = region[:, None, :] != region[:, :, None]
    mask = torch.zeros(different.shape, device=device, dtype=dtype or torch.get_default_dtype())
    return mask.masked_fill_(different, _MASK_VALUE)


def window_token_order(x_size: tuple[int, int], padded: tuple[int, int], window: tuple[int, int],
                       shift: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Source token of every (window, position) slot, -1 for zero padding.

    The H x W map is zero-padded right/bottom to ``padded``, rolled by -shift, then cut into windows in
    row-major window order; slot ``w * N + n`` holds the flat index (row * W + col) of the unpadded token that
    lands there.
    """
    height, width = x_size
    ph, pw = padded
    # (i + shift) % side as a roll: the same indices, and it exports with symbolic sides (ONNX has no remainder
    # by a symbolic scalar)
    rows = torch.arange(ph, device=device).roll(-shift[0]).view(ph // window[0], window[0])
    cols = torch.arange(pw, device=device).roll(-shift[1]).view(pw // window[1], window[1])
    rows = rows[:, None, :, None]
    cols = cols[None, :, None, :]
    token = torch.where((rows < height) & (cols < width), rows * width + cols, -1)
    return token.reshape(-1)


def size_value(n: Any) -> Any:
    """An image side as an int; a symbolic one (``torch.export`` with dynamic height and width) stays symbolic,
    where ``int()`` would fix it to the size traced."""
    return n if isinstance(n, torch.SymInt) else int(n)


def _hashable(key: Any) -> Any:
    """``key`` with symbolic sizes replaced by their expressions (a SymInt cannot be hashed); equal expressions
    are the same size, so the memo still serves every block of one forward."""
    if isinstance(key, torch.SymInt):
        return ("symint", str(key))
    if isinstance(key, tuple):
        return tuple(_hashable(k) for k in key)
    return key


def pad_always() -> bool:
    """True while ``torch.export`` traces with symbolic sizes: a pad of zero is then emitted rather than decided
    on the size traced (a zero pad is exact, so eager numerics do not depend on this)."""
    return torch.compiler.is_exporting()


_T = TypeVar("_T")
Window = tuple[tuple[int, int], tuple[int, int]]  # (window (rows, cols), shift (rows, cols))


class WindowPlan:
    """What (shifted) window attention needs for one input size, built on first use and shared by all blocks.

    DAT and SwinIR make one per forward, for the size of its input, and hand it to every block: shift masks and
    token orders are then built once per forward rather than once per block. Being per forward (a handful of
    small integer ops), nothing is stored on the model, so nothing can go stale across sizes, devices, dtypes or
    autograd modes.

    Args:
        x_size: (H, W) of the token map.
        device: where masks and indices are built.
        dtype: dtype of the masks (the default dtype when None).
    """

    def __init__(self, x_size: tuple[int, int], device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.x_size = (size_value(x_size[0]), size_value(x_size[1]))
        self.device = device
        self.dtype = dtype or torch.get_default_dtype()
        self._memo: dict[tuple[Any, ...], Any] = {}

    def memo(self, key: tuple[Any, ...], build: Callable[[], _T]) -> _T:
        """``build()``, once per key and plan: for indices derived from orders (an architecture's own layouts)."""
        key = _hashable(key)
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def order(self, window: tuple[int, int], shift: tuple[int, int],
              padded: tuple[int, int] | None = None) -> torch.Tensor:
        """:func:`window_token_order` of this map, zero-padded to ``padded`` (default: no padding)."""
        padded = self.x_size if padded is None else tuple(padded)
        return self.memo(("order", window, shift, padded),
                         lambda: window_token_order(self.x_size, padded, window, shift, self.device))

    def mask(self, window: tuple[int, int], shift: tuple[int, int],
             padded: tuple[int, int] | None = None) -> torch.Tensor | None:
        """:func:`shift_window_mask` for the (padded) map, or None for unshifted windows (the mask would be all
        zeros, and adding zeros is exact)."""
        if shift == (0, 0):
            return None
        size = self.x_size if padded is None else tuple(padded)
        return self.memo(("mask", window, shift, size),
                         lambda: shift_window_mask(size, window, shift, self.device, self.dtype))

    def move(self, src: Window | None, dst: Window | None) -> torch.Tensor | None:
        """Index that gathers tokens in ``src`` window order into ``dst`` order (None: raster order of the unpadded
        map); None when the two orders coincide."""
        def build() -> torch.Tensor | None:
            if src == dst:
                return None
            if src is None:
                index = self.order(*dst)
            elif dst is None:
                index = self._inverse(src)
            else:
                index = self._inverse(src)[self.order(*dst)]
            # Under export the sizes are symbolic, so whether the gather is the identity is not known: keep it.
            if not torch.compiler.is_exporting() and torch.equal(index, torch.arange(index.numel(),
                                                                                     device=self.device)):
                return None  # e.g. a single window covering the whole map
            return index
        return self.memo(("move", src, dst), build)

    def _inverse(self, key: Window) -> torch.Tensor:
        def build() -> torch.Tensor:
            order = self.order(*key)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=self.device)
            return inverse
        return self.memo(("inverse", key), build)

def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv before a residual add in DAT and SwinIR: '1conv' (3x3) or '3conv' (bottlenecked at dim // 4,
    fewer parameters than one full 3x3 conv)."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
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
