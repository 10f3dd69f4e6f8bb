"""RFDN: Residual Feature Distillation Network (x4 super-resolution).

Paper: Jie Liu, Jie Tang, Gangshan Wu, "Residual Feature Distillation Network for Lightweight Image
Super-Resolution", ECCV 2020 Workshops (winner of the AIM 2020 efficient SR challenge).
Official code: https://github.com/njulj/RFDN (``RFDN.py``, ``block.py``); released weights
``trained_model/RFDN_AIM.pth`` (a bare, legacy-serialised ``state_dict``).

This is an independent re-implementation with the official constructor keywords and ``state_dict`` keys
(``fea_conv``, ``B1``..``B4``, ``c``, ``LR_conv``, ``upsampler``), so the release loads strictly as is.

Behaviour kept from the official code, on purpose:

* No input normalisation, padding or output clamp. ``RFDN_AIM.pth`` was trained on the 0-255 pixel scale;
  fed [0, 1] inputs it does worse than bicubic.
* ``upscale`` is accepted and ignored: the upsampler is always a x4 pixel shuffle.
* The forward always chains exactly four blocks ``B1``..``B4``; ``num_modules`` only sized the fusion conv
  ``c``. Any other value gives a model whose forward fails on a channel mismatch, so it is refused here.
* The ESA branch shrinks the map with a stride-2 unpadded conv and a 7x7/3 max pool, so inputs need
  H, W >= 15.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RFDN", "RFDB", "ESA"]

_LRELU_SLOPE = 0.05
_UPSCALE = 4
_NUM_BLOCKS = 4
# Smallest H or W for which ESA's conv (3x3, stride 2, no padding) leaves the 7x7 max-pool a full window.
MIN_INPUT_SIZE = 15


def conv_same(in_ch: int, out_ch: int, kernel_size: int) -> nn.Conv2d:
    """Stride-1 conv with bias and the 'same' zero padding of an odd kernel."""
    return nn.Conv2d(in_ch, out_ch, kernel_size, padding=(kernel_size - 1) // 2)


def channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """NHWC copy of a CPU batch, other devices untouched.

    oneDNN convolves NHWC activations directly; NCHW ones are reordered to its blocked layout and back around
    every conv (8% of a one-thread CPU forward here, more with two threads). Values change only by summation
    order.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def lrelu_(x: torch.Tensor) -> torch.Tensor:
    # In place as upstream: every call site owns a fresh tensor nobody else reads.
    return F.leaky_relu(x, _LRELU_SLOPE, inplace=True)


class ESA(nn.Module):
    """Enhanced spatial attention: a sigmoid mask from a strided, max-pooled low-resolution branch."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        f = n_feats // 4
        self.conv1 = conv_same(n_feats, f, 1)
        self.conv_f = conv_same(f, f, 1)
        self.conv_max = conv_same(f, f, 3)
        # Unpadded on purpose (upstream passes padding=0): this is what sets the 15-pixel minimum.
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = conv_same(f, f, 3)
        self.conv3_ = conv_same(f, f, 3)
        self.conv4 = conv_same(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        c1 = F.max_pool2d(self.conv2(c1_), kernel_size=7, stride=3)
        c3 = F.relu(self.conv_max(c1), inplace=True)
        c3 = F.relu(self.conv3(c3), inplace=True)
        c3 = F.interpolate(self.conv3_(c3), size=x.shape[-2:], mode="bilinear", align_corners=False)
        # c3 is the interpolation's own buffer, so accumulating into it costs no extra map.
        mask = torch.sigmoid(self.conv4(c3.add_(self.conv_f(c1_))))
        return x * mask


class RFDB(nn.Module):
    """Residual feature distillation block: three distill/refine steps, a last 3x3, 1x1 fusion, ESA."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        dc = in_channels // 2  # distilled channels per step
        rc = in_channels  # refined (remaining) channels, kept at full width
        self.c1_d = conv_same(in_channels, dc, 1)
        self.c1_r = conv_same(in_channels, rc, 3)
        self.c2_d = conv_same(rc, dc, 1)
        self.c2_r = conv_same(rc, rc, 3)
        self.c3_d = conv_same(rc, dc, 1)
        self.c3_r = conv_same(rc, rc, 3)
        self.c4 = conv_same(rc, dc, 3)
        self.c5 = conv_same(dc * 4, in_channels, 1)
        self.esa = ESA(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = lrelu_(self.c1_d(x))
        r1 = lrelu_(self.c1_r(x) + x)
        d2 = lrelu_(self.c2_d(r1))
        r2 = lrelu_(self.c2_r(r1) + r1)
        d3 = lrelu_(self.c3_d(r2))
        r3 = lrelu_(self.c3_r(r2) + r2)
        r4 = lrelu_(self.c4(r3))
        return self.esa(self.c5(torch.cat((d1, d2, d3, r4), dim=1)))


class RFDN(nn.Module):
    """RFDN x4. Keyword names and defaults are the official ones; defaults build the RFDN_AIM model.

    Args:
        in_nc: input channels.
        nf: feature width.
        num_modules: must be 4 (see the module docstring).
        out_nc: output channels.
        upscale: ignored, as upstream; the factor is always 4 (also exposed as ``self.scale``).
    """

    def __init__(self, in_nc: int = 3, nf: int = 50, num_modules: int = 4, out_nc: int = 3,
                 upscale: int = 4) -> None:
        super().__init__()
        if num_modules != _NUM_BLOCKS:
            raise ValueError(
                f"RFDN always chains exactly {_NUM_BLOCKS} blocks (B1..B4); num_modules={num_modules} would "
                "only resize the fusion conv and break its forward, so it must be 4")
        del upscale  # upstream ignores it as well
        self.scale = _UPSCALE
        self.fea_conv = conv_same(in_nc, nf, 3)
        self.B1 = RFDB(nf)
        self.B2 = RFDB(nf)
        self.B3 = RFDB(nf)
        self.B4 = RFDB(nf)
        self.c = nn.Sequential(conv_same(nf * num_modules, nf, 1), nn.LeakyReLU(_LRELU_SLOPE, inplace=True))
        self.LR_conv = conv_same(nf, nf, 3)
        self.upsampler = nn.Sequential(conv_same(nf, out_nc * _UPSCALE ** 2, 3), nn.PixelShuffle(_UPSCALE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
            raise ValueError(f"RFDN needs H, W >= {MIN_INPUT_SIZE} (its ESA pools 7x7 at 1/2 resolution); "
                             f"got {h}x{w}")
        fea = self.fea_conv(channels_last_on_cpu(x))
        b1 = self.B1(fea)
        b2 = self.B2(b1)
        b3 = self.B3(b2)
        b4 = self.B4(b3)
        out = self.LR_conv(self.c(torch.cat((b1, b2, b3, b4), dim=1))) + fea
        return self.upsampler(out).contiguous()


def min_input_size(**_: object) -> int:
    """The smallest LR side: ESA's unpadded stride-2 conv, then a 7x7 max pool with stride 3."""
    return MIN_INPUT_SIZE


# --- Variants: name -> (constructor kwargs, the pixel range the released weights compute in) ---------------------
# RFDN_AIM.pth (the AIM 2020 winner) was trained on 0-255 inputs; small and tiny are this project's CPU and test
# sizes.

VARIANTS: dict[str, tuple[dict, float]] = {
    "rfdn": (dict(in_nc=3, nf=50, num_modules=4, out_nc=3, upscale=4), 255.0),
    "rfdn_small": (dict(in_nc=3, nf=16, num_modules=4, out_nc=3, upscale=4), 1.0),
    "rfdn_tiny": (dict(in_nc=3, nf=16, num_modules=4, out_nc=3, upscale=4), 1.0),
}
