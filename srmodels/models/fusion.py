"""Fusion of the members' SR outputs by learned per-pixel (or per-image) weights.

``AttentionWeightNet`` is the per-pixel weight network of NTIRE 2025 image SR x4 team 27 ("Junyi"; released as
``models/team27_FusionNet.py`` in wentheart/cvpr2025sr): 3x3 convs 3N->64->32->16 with ReLU, a 1x1 conv to N, softmax
over the members. With ``num_members=3`` it has the team's 28,387 parameters and loads their checkpoint
strictly. ``ImageWeightNet`` is their comparative variant: one weight per member per image, predicted from the LR
input. Both only predict weights; ``fuse`` applies them, so the weights can be inspected and pictured.
``load_fusion`` rebuilds a trained net from its checkpoint (the test stage, ``srmodels export``).

Each net ends in one of two heads (``head``), which turn its last layer's outputs (one logit per member) into
weights:
- ``softmax``: team 27's, convex weights. It can start at one member only by saturating odds
  (``start_at_member``), which training must then move away from.
- ``residual``: ``out = c_anchor + sum_i w_i * (c_i - c_anchor)`` with ``w_i = tanh(logit_i)`` for the other
  members, i.e. weights ``w_i`` and ``1 - sum_i w_i`` for the anchor. With the last layer at zero
  (``start_at_anchor``) the output is the anchor exactly, and every member's weight has the gradient
  ``c_i - c_anchor`` from the first step. tanh bounds each pull to (-1, 1): an affine, not convex, combination,
  able to reach any member and to extrapolate by at most as far again.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from srmodels.models.checkpoint import CheckpointError, checkpoint_meta, load_into, read_checkpoint, unwrap_state_dict


def fuse(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of N RGB members.

    members: (B, 3N, H, W), the members concatenated on channels; weights: (B, N, H, W) or (B, N, 1, 1).
    """
    b, c, h, w = outputs.shape
    n = weights.shape[1]
    if c != 3 * n:
        raise ValueError(f"{c} member channels do not match {n} weights (expected {3 * n})")
    return (outputs.view(b, n, 3, h, w) * weights.unsqueeze(2)).sum(dim=1)


HEADS = ("softmax", "residual")


def residual_weights(logits: torch.Tensor, anchor: int) -> torch.Tensor:
    """The residual head's weights over the members: ``tanh(logit_i)`` for each member but the anchor,
    ``1 - sum`` of those for the anchor (whose own logit is unused). (B, N, ...) -> (B, N, ...)."""
    pull = torch.tanh(logits)
    others = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    others[anchor] = False
    pull = pull * others.view(1, -1, *([1] * (logits.dim() - 2)))
    weights = pull.clone()
    weights[:, anchor] = 1.0 - pull.sum(dim=1)
    return weights


def _head_weights(logits: torch.Tensor, head: str, anchor: int) -> torch.Tensor:
    if head == "softmax":
        return torch.softmax(logits, dim=1)
    return residual_weights(logits, anchor)


def _check_head(num_members: int, head: str, anchor: int) -> None:
    if num_members < 2:
        raise ValueError(f"fusion needs at least 2 members, got {num_members}")
    if head not in HEADS:
        raise ValueError(f"unknown fusion head {head!r}; valid: {', '.join(HEADS)}")
    if not 0 <= anchor < num_members:
        raise ValueError(f"anchor {anchor} is not one of the {num_members} members")


class AttentionWeightNet(nn.Module):
    """Per-pixel weights over ``num_members`` SR outputs (team 27's fusion net; ``head='softmax'`` is theirs).

    ``anchor``: the member the residual head starts from (unused by the softmax head). The head is kept as
    ``head_kind``: ``ImageWeightNet.head`` is a layer, under its upstream name.
    """

    def __init__(self, num_members: int = 3, head: str = "softmax", anchor: int = 0) -> None:
        super().__init__()
        _check_head(num_members, head, anchor)
        self.num_members, self.head_kind, self.anchor = num_members, head, anchor
        self.conv1 = nn.Conv2d(3 * num_members, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 32, 3, padding=1)
        self.attention = nn.Sequential(
            nn.Conv2d(32, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, num_members, 1),
        )

    def output_layer(self) -> nn.Conv2d:
        """The conv whose outputs the softmax turns into weights."""
        return self.attention[-1]

    def config(self) -> dict[str, Any]:
        """The constructor's arguments: what a checkpoint records to rebuild the net."""
        return {"num_members": self.num_members, "head": self.head_kind, "anchor": self.anchor}

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(outputs))
        x = F.relu(self.conv2(x))
        return _head_weights(self.attention(x), self.head_kind, self.anchor)


class ImageWeightNet(nn.Module):
    """One weight per member per image, predicted from the LR input (team 27's comparison)."""

    def __init__(self, num_members: int = 2, in_chans: int = 3, num_feat: int = 64, head: str = "softmax",
                 anchor: int = 0) -> None:
        super().__init__()
        _check_head(num_members, head, anchor)
        self.num_members, self.head_kind, self.anchor = num_members, head, anchor
        self.in_chans, self.num_feat = in_chans, num_feat
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, num_feat, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat, num_feat, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat, num_members, 1),
        )

    def output_layer(self) -> nn.Conv2d:
        """The conv whose outputs the softmax turns into weights."""
        return self.head[-1]

    def config(self) -> dict[str, Any]:
        """The constructor's arguments: what a checkpoint records to rebuild the net."""
        return {"num_members": self.num_members, "in_chans": self.in_chans, "num_feat": self.num_feat,
                "head": self.head_kind, "anchor": self.anchor}

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        pooled = self.features(lr).mean(dim=(2, 3), keepdim=True)
        return _head_weights(self.head(pooled), self.head_kind, self.anchor)


# kind -> class; the pipeline's ``fusion.kind`` param names one of these.
FUSION_KINDS: dict[str, type[nn.Module]] = {"pixel": AttentionWeightNet, "image": ImageWeightNet}
# A fusion checkpoint's description names its net ``fusion_<kind>`` as its arch.
ARCH_PREFIX = "fusion_"


def fusion_kind(meta: Mapping[str, Any] | None) -> str | None:
    """The kind of fusion net a checkpoint description (:func:`checkpoint_meta`) names; None for any other."""
    arch = str((meta or {}).get("arch", ""))
    return arch[len(ARCH_PREFIX):] if arch.startswith(ARCH_PREFIX) else None


def load_fusion(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Our fusion net checkpoint (the fusion stage's ``best.pth``, or its export as safetensors) rebuilt in eval
    mode, and its description; its kind is :func:`fusion_kind` of that. Anything else is a ``CheckpointError``."""
    raw = read_checkpoint(path)
    meta = checkpoint_meta(raw)
    kind = fusion_kind(meta)
    if meta is None or kind is None:
        raise CheckpointError(f"{path}: not a fusion checkpoint of this pipeline (re-run the fusion stage)")
    if kind not in FUSION_KINDS:
        raise CheckpointError(f"{path}: unknown fusion kind {kind!r}; known: {', '.join(FUSION_KINDS)}")
    kwargs = dict(meta["kwargs"])
    if "num_candidates" in kwargs:  # the key's name in fusion checkpoints of srmodels 0.1.0
        kwargs["num_members"] = kwargs.pop("num_candidates")
    net = FUSION_KINDS[kind](**kwargs)
    load_into(net, unwrap_state_dict(raw, source=str(path)), source=str(path))
    return net.eval(), meta


# How the fusion net starts (params: fusion.init). best_member: the member that scores best on validation, so
# epoch 0 is that member and selection on validation can only keep or improve it; random: team 27's init.
INITS = ("best_member", "random")
# Odds of the chosen member at the start: weight 1 - 1/512, so the fused value is within 1/512 of the member's
# and its 8-bit rounding within one level, whatever the other members are (all in [0, 1]).
_SELECT_ODDS = 511


def start_at_member(net: nn.Module, index: int) -> None:
    """Make ``net`` weight member ``index`` by 1 - 1/512 everywhere, in a way training moves away from.

    The output layer's weights become zero and its bias favours the member: the softmax is then constant and
    far from saturated (its gradient is 1/512 of its largest, which Adam's per-parameter scaling turns into steps
    of the usual size). The first step gives the output layer non-zero weights, after which every layer learns.
    """
    layer = net.output_layer()
    n = layer.out_channels
    if not 0 <= index < n:
        raise ValueError(f"member {index} of {n}")
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.bias[index] = math.log(_SELECT_ODDS * (n - 1))


def start_at_anchor(net: nn.Module, index: int) -> None:
    """Make a residual-head ``net`` output member ``index`` exactly: it becomes the anchor and the last
    layer starts at zero (weights and bias), so every pull is tanh(0) = 0 until the first step moves it."""
    if net.head_kind != "residual":
        raise ValueError(f"start_at_anchor needs the residual head, not {net.head_kind!r}")
    _check_head(net.num_members, "residual", index)
    net.anchor = index
    with torch.no_grad():
        net.output_layer().weight.zero_()
        net.output_layer().bias.zero_()


def fusion_inputs(kind: str, outputs: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """What each kind of weight net looks at: the members (pixel) or the LR image (image)."""
    return outputs if kind == "pixel" else lr


def fusion_loss(fused: torch.Tensor, hr: torch.Tensor, l1_weight: float = 0.8, mse_weight: float = 0.2) -> torch.Tensor:
    """Team 27's objective: ``l1_weight * L1 + mse_weight * MSE`` of the fused image against HR."""
    return l1_weight * F.l1_loss(fused, hr) + mse_weight * F.mse_loss(fused, hr)
