"""Parameters and MACs per output pixel (srmodels.models.costs)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from srmodels.models.costs import count_macs, fusion_macs_per_output_pixel, macs_per_output_pixel, num_params
from srmodels.models.fusion import AttentionWeightNet, ImageWeightNet
from srmodels.models.model import build_model


class TwoConv(nn.Module):
    """conv 3->8 (3x3), ReLU, conv 8->48 (3x3), pixel shuffle x4: a plain x4 conv net."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3 * 16, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.b(F.relu(self.a(x))), 4)


def test_plain_conv_net_matches_a_hand_count():
    net = TwoConv()
    # per LR pixel: 8 outputs x 3 x 3x3 taps + 48 outputs x 8 x 3x3 taps (biases are not MACs)
    per_lr_pixel = 8 * 3 * 9 + 48 * 8 * 9
    assert count_macs(net, torch.zeros(1, 3, 10, 12)) == per_lr_pixel * 10 * 12
    assert macs_per_output_pixel(net, (10, 12), 4) == per_lr_pixel / 16
    assert macs_per_output_pixel(net, (10, 12), 4, self_ensemble=True) == 8 * per_lr_pixel / 16 + 24
    assert num_params(net) == (8 * 3 * 9 + 8) + (48 * 8 * 9 + 48)
    assert net.training  # mode restored


class Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, x):  # x: (B, heads, tokens, dim)
        bias = torch.zeros(x.shape[-2], x.shape[-2])
        if self.fused:
            return F.scaled_dot_product_attention(x, x, x, attn_mask=bias)
        return torch.softmax(x @ x.transpose(-2, -1) / x.shape[-1] ** 0.5 + bias, dim=-1) @ x


def test_attention_is_counted_on_cpu_both_ways():
    x = torch.zeros(2, 3, 16, 8)
    want = 2 * (2 * 3 * 16 * 16 * 8)  # QK^T and AV
    assert count_macs(Attention(fused=False), x) == want
    assert count_macs(Attention(fused=True), x) == want


def test_swinir_attention_is_in_its_count():
    model = build_model("swinir_tiny")
    linear_and_conv = 0

    def hook(m, inp, out):
        nonlocal linear_and_conv
        if isinstance(m, nn.Linear):
            linear_and_conv += inp[0].numel() // m.in_features * m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            linear_and_conv += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 16, 16))
    finally:
        for h in handles:
            h.remove()
    # windows of 8x8 = 64 tokens, 60 channels: QK^T and AV cost 2 x 64 x 60 per token per block (4 blocks)
    attention = 4 * 2 * 64 * 60 * 16 * 16
    assert count_macs(model, torch.zeros(1, 3, 16, 16)) == linear_and_conv + attention


def test_fusion_costs():
    net = AttentionWeightNet(3)
    assert num_params(net) == 28387  # team 27's net
    per_pixel = 9 * 64 * 9 + 64 * 32 * 9 + 32 * 16 * 9 + 16 * 3
    assert fusion_macs_per_output_pixel(net, "pixel", (8, 12)) == per_pixel + 9
    image = ImageWeightNet(2)
    lr_pixels = 3 * 64 * 9 + 64 * 64 * 9
    got = fusion_macs_per_output_pixel(image, "image", (16, 16))
    assert got == (lr_pixels * 16 + 64 * 64 + 64 * 2) / 256 + 6
