"""RRDBNet: the ESRGAN / Real-ESRGAN generator (Residual-in-Residual Dense Blocks).

Paper: Xintao Wang et al., "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks", ECCV 2018
Workshops; the same generator is used by Real-ESRGAN (Wang et al., ICCV 2021 Workshops).
Official code: https://github.com/XPixelGroup/BasicSR ``basicsr/archs/rrdbnet_arch.py`` (originally
https://github.com/xinntao/ESRGAN).

This is an independent re-implementation with BasicSR's constructor keywords and ``state_dict`` keys
(``conv_first``, ``body.N.rdbM.convK``, ``conv_body``, ``conv_up1/2``, ``conv_hr``, ``conv_last``), so the
BasicSR and Real-ESRGAN releases load strictly (``'params'`` / ``'params_ema'``). The original ESRGAN files use
older names and need the key mapping documented in the reference pack.

Forward semantics as upstream: no normalisation or clamp; the trunk always upsamples x4 (nearest x2, conv,
LeakyReLU 0.2, twice). For ``scale`` 2 or 1 the input is first pixel-unshuffled by 2 or 4, so H and W must be
divisible by that factor and ``conv_first`` sees 4x or 16x the channels. Other ``scale`` values are refused:
upstream would silently treat them as 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RRDBNet", "RRDB", "ResidualDenseBlock"]

_LRELU_SLOPE = 0.2
_RESIDUAL_SCALE = 0.2
# Model scale -> pixel-unshuffle factor applied to the input so the fixed x4 trunk lands on that scale.
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    """Stride-1, zero-padded 3x3 conv with bias (every conv of this network)."""
    return nn.Conv2d(in_ch, out_ch, 3, 1, 1)


def channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """NHWC copy of a CPU batch, other devices untouched.

    oneDNN convolves NHWC activations directly; NCHW ones are reordered to its blocked layout and back around
    every conv (~5% of a one-thread CPU forward here). Values change only by summation order.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def lrelu_(x: torch.Tensor) -> torch.Tensor:
    # In place as upstream: applied only to fresh conv outputs.
    return F.leaky_relu(x, _LRELU_SLOPE, inplace=True)


@torch.no_grad()
def scaled_kaiming_init_(modules: list[nn.Conv2d], scale: float) -> None:
    """Kaiming-normal weights times ``scale``, zero biases (BasicSR's init for the dense-block convs).

    The small scale keeps each residual branch near identity at the start of training; it does not matter
    for loading trained weights.
    """
    for m in modules:
        if m.weight.is_meta:
            # Shape-only build: nothing to draw, and normal_ on meta tensors is very slow (about 2 s here).
            continue
        nn.init.kaiming_normal_(m.weight)
        m.weight.mul_(scale)
        if m.bias is not None:
            m.bias.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the last maps back to ``num_feat`` and is added at scale 0.2."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = conv3x3(num_feat, num_grow_ch)
        self.conv2 = conv3x3(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = conv3x3(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = conv3x3(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = conv3x3(num_feat + 4 * num_grow_ch, num_feat)
        scaled_kaiming_init_([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = lrelu_(self.conv1(x))
        x2 = lrelu_(self.conv2(torch.cat((x, x1), 1)))
        x3 = lrelu_(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = lrelu_(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return torch.add(x, x5, alpha=_RESIDUAL_SCALE)


class RRDB(nn.Module):
    """Three dense blocks in sequence, wrapped in a second residual connection scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.rdb3(self.rdb2(self.rdb1(x))), alpha=_RESIDUAL_SCALE)


class RRDBNet(nn.Module):
    """ESRGAN generator. Keyword names and defaults are BasicSR's.

    Args:
        num_in_ch: input channels (before any pixel-unshuffle).
        num_out_ch: output channels.
        scale: 4, 2 or 1 (output size over input size).
        num_feat: trunk width.
        num_block: number of RRDBs in ``body``.
        num_grow_ch: growth channels of each dense block.
    """

    def __init__(self, num_in_ch: int, num_out_ch: int, scale: int = 4, num_feat: int = 64, num_block: int = 23,
                 num_grow_ch: int = 32) -> None:
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be one of {sorted(_UNSHUFFLE)}, got {scale}")
        self.scale = scale
        self.unshuffle_factor = _UNSHUFFLE[scale]
        self.conv_first = conv3x3(num_in_ch * self.unshuffle_factor ** 2, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = conv3x3(num_feat, num_feat)
        self.conv_up1 = conv3x3(num_feat, num_feat)
        self.conv_up2 = conv3x3(num_feat, num_feat)
        self.conv_hr = conv3x3(num_feat, num_feat)
        self.conv_last = conv3x3(num_feat, num_out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle_factor > 1:
            # Same channel order as BasicSR's own pixel_unshuffle (c, dy, dx), which released x2/x1 weights expect.
            x = F.pixel_unshuffle(x, self.unshuffle_factor)
        feat = self.conv_first(channels_last_on_cpu(x))
        feat = feat + self.conv_body(self.body(feat))
        feat = lrelu_(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        feat = lrelu_(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        return self.conv_last(lrelu_(self.conv_hr(feat))).contiguous()


# --- Variants: name -> (constructor kwargs, the pixel range the released weights compute in) ---------------------
# The ESRGAN / Real-ESRGAN generator; small and tiny are this project's CPU and test sizes.

VARIANTS: dict[str, tuple[dict, float]] = {
    "rrdbnet": (dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32), 1.0),
    "rrdbnet_small": (dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=16, num_block=2, num_grow_ch=8), 1.0),
    "rrdbnet_tiny": (dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=16, num_block=2, num_grow_ch=8), 1.0),
}
