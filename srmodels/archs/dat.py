"""DAT: Dual Aggregation Transformer for image super-resolution.

Paper: "Dual Aggregation Transformer for Image Super-Resolution", Zheng Chen, Yulun Zhang, Jinjin Gu,
Linghe Kong, Xiaokang Yang, Xin Yuan. ICCV 2023. https://arxiv.org/abs/2308.03364
Official code: https://github.com/zhengchen1999/DAT (basicsr/archs/dat_arch.py).

This is an independent re-implementation. Constructor keywords, module attribute names (hence
``state_dict`` keys, including every persistent buffer) and forward semantics follow the official code,
so released checkpoints load with ``strict=True`` and give the same outputs up to float32 rounding.
The forward is organised for CPU speed instead of following the official op sequence:

* the spatial attention moves q, k, v into window order (zero padding, cyclic shift and window
  partition at once) with one row gather, and moves the result back (un-partition, reverse shift,
  crop) with another, instead of a chain of permute/pad/roll/contiguous copies;
* both window orientations run as one batched attention;
* feature maps stay token-major; the convolutions see them as channels-last NCHW views, so no
  transposes are needed around them;
* shift masks and gather indices for a given input size are built once per forward and shared by
  all blocks, instead of once per block (a ``_layers.WindowPlan``, the design SwinIR shares);
* the channel attention divides its small (d x d) score matrix by the token norms of q and k instead
  of normalising q and k along their strided token axis;

The layers themselves are plain ``nn.Linear`` / ``nn.Conv2d``; ``srmodels.models.accelerate`` swaps in CPU inference
kernels explicitly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils import checkpoint

from srmodels.archs._layers import (DropPath, Upsample, UpsampleOneStep, WindowPlan, pad_always, residual_conv, shift_window_mask,
                      to_2tuple, trunc_normal_)

__all__ = ["DAT"]


def _tokens_as_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) view; channels-last in memory when x is contiguous."""
    return x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


def _image_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as (B, H*W, C); free for channels-last memory, a copy otherwise."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def _pad_to(n: int, multiple: int) -> int:
    # Rounded up as (n + m - 1) // m * m: with symbolic sizes (export) the result is then visibly a multiple of m.
    return (n + multiple - 1) // multiple * multiple


def _window_gather_indices(batch: int, length: int, order: torch.Tensor, n_tok: int,
                           heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices that move qkv into window order and the attention output back.

    order: (2, slots) token order of each branch (``_layers.window_token_order``, -1 for padding); n_tok:
    tokens per window.

    qkv rows: the (B*L [+1 zero token], 3 * 2 * heads * d) projection seen as rows of d channels,
    row ((token * 3 + t) * 2 + branch) * heads + head. Gathering with ``into`` gives
    (3, 2, B, windows, heads, N, d). The attention output (2, B, windows, heads, N, d) seen as rows of d,
    gathered with ``back``, gives (B, L, 2 * heads * d) with the branch halves in channel order.
    """
    device = order.device
    n_slots = order.shape[1]
    valid = order >= 0
    batch_offset = torch.arange(batch, device=device).view(1, batch, 1) * length
    # padding slots read the one all-zero token appended after the last real token
    token = torch.where(valid.unsqueeze(1), order.unsqueeze(1) + batch_offset, batch * length)
    token = token.view(2, batch, n_slots // n_tok, 1, n_tok)  # branch, b, window, (head), n
    t = torch.arange(3, device=device).view(3, 1, 1, 1, 1, 1)
    br = torch.arange(2, device=device).view(1, 2, 1, 1, 1, 1)
    head = torch.arange(heads, device=device).view(1, 1, 1, 1, heads, 1)
    into = ((token.unsqueeze(0) * 3 + t) * 2 + br) * heads + head

    # slot[branch, token]: where each real token sits. Padding slots scatter into one extra column, dropped after,
    # rather than being masked out first: the same result, and the shapes do not depend on the values (export).
    slots = torch.arange(n_slots, device=device).expand(2, n_slots)
    slot = torch.zeros(2, length + 1, dtype=torch.long, device=device)
    slot = slot.scatter(1, torch.where(valid, order, length), slots)[:, :length]
    window, pos = slot // n_tok, slot % n_tok  # (2, L)
    n_windows = n_slots // n_tok
    b_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    br = torch.arange(2, device=device).view(1, 1, 2, 1)
    head = torch.arange(heads, device=device).view(1, 1, 1, heads)
    window = window.t().reshape(1, length, 2, 1)
    pos = pos.t().reshape(1, length, 2, 1)
    back = (((br * batch + b_idx) * n_windows + window) * heads + head) * n_tok + pos
    return into.reshape(-1), back.reshape(-1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     biases: Sequence[Optional[torch.Tensor]], masks: Optional[Sequence[torch.Tensor]],
                     attn_drop: nn.Module) -> torch.Tensor:
    """softmax(q k^T * scale + bias [+ mask]) v, batched over branches.

    q, k, v: (branches, B, windows, heads, N, d); biases[i]: (heads, N, N) or None; masks[i]: (windows, N, N).
    """
    attn = (q * scale) @ k.transpose(-2, -1)
    for i, bias in enumerate(biases):
        # indexing (not unbind) keeps the in-place adds legal under autograd
        if bias is not None:
            attn[i].add_(bias)
        if masks is not None:
            attn[i].add_(masks[i].unsqueeze(1))
    return attn_drop(attn.softmax(dim=-1)) @ v


class SpatialGate(nn.Module):
    """Gate one half of the hidden channels with a depthwise-conv map of the other half."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        x2 = _image_as_tokens(self.conv(_tokens_as_image(self.norm(x2), H, W)))
        return x1 * x2


class SGFN(nn.Module):
    """Spatial-gate feed-forward network: fc1, activation, spatial gate (halves the width), fc2."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.sg = SpatialGate(hidden_features // 2)
        self.fc2 = nn.Linear(hidden_features // 2, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.sg(x, H, W))
        return self.drop(self.fc2(x))


class DynamicPosBias(nn.Module):
    """Relative position bias produced by a small MLP from (dy, dx) offsets (CrossFormer style)."""

    def __init__(self, dim: int, num_heads: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.num_heads = num_heads
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True),
                                  nn.Linear(self.pos_dim, self.pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True),
                                  nn.Linear(self.pos_dim, self.pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True),
                                  nn.Linear(self.pos_dim, self.num_heads))

    def forward(self, biases: torch.Tensor) -> torch.Tensor:
        pos = self.pos_proj(biases)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
            return self.pos3(pos)
        return self.pos3(self.pos2(self.pos1(pos)))


class Spatial_Attention(nn.Module):
    """One window orientation of the spatial attention: its position bias and attention settings.

    Branch ``idx`` 0 uses split_size[0] x split_size[1] windows (rows x cols), branch 1 the transpose.
    The attention itself runs batched over both branches in Adaptive_Spatial_Attention.
    """

    def __init__(self, dim: int, idx: int, split_size: Sequence[int] = (8, 8), dim_out: Optional[int] = None,
                 num_heads: int = 6, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 qk_scale: Optional[float] = None, position_bias: bool = True) -> None:
        super().__init__()
        if idx not in (0, 1):
            raise ValueError(f"idx must be 0 or 1, got {idx}")
        self.dim = dim
        self.dim_out = dim_out or dim
        self.split_size = split_size
        self.num_heads = num_heads
        self.idx = idx
        self.position_bias = position_bias
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.H_sp, self.W_sp = (split_size[0], split_size[1]) if idx == 0 else (split_size[1], split_size[0])

        if position_bias:
            self.pos = DynamicPosBias(self.dim // 4, self.num_heads, residual=False)
            dy = torch.arange(1 - self.H_sp, self.H_sp)
            dx = torch.arange(1 - self.W_sp, self.W_sp)
            offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij")).flatten(1).t().float()
            self.register_buffer("rpe_biases", offsets)
            ys, xs = torch.meshgrid(torch.arange(self.H_sp), torch.arange(self.W_sp), indexing="ij")
            ys, xs = ys.flatten(), xs.flatten()
            rel_y = ys[:, None] - ys[None, :] + self.H_sp - 1
            rel_x = xs[:, None] - xs[None, :] + self.W_sp - 1
            self.register_buffer("relative_position_index", rel_y * (2 * self.W_sp - 1) + rel_x)
        self.attn_drop = nn.Dropout(attn_drop)

    def relative_bias(self) -> Optional[torch.Tensor]:
        """(heads, N, N) additive bias for one window, or None without position bias."""
        if not self.position_bias:
            return None
        n = self.H_sp * self.W_sp
        table = self.pos(self.rpe_biases)
        # contiguous: it is added to every window, and a strided operand slows those adds down
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


class Adaptive_Spatial_Attention(nn.Module):
    """Spatial window self-attention in two orientations (half the channels each) plus a depthwise-conv
    branch, joined by the adaptive interaction module (channel and spatial gating)."""

    def __init__(self, dim: int, num_heads: int, reso: int = 64, split_size: Sequence[int] = (8, 8),
                 shift_size: Sequence[int] = (1, 2), qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, rg_idx: int = 0, b_idx: int = 0) -> None:
        super().__init__()
        if not (0 <= shift_size[0] < split_size[0] and 0 <= shift_size[1] < split_size[1]):
            raise ValueError(f"shift_size {shift_size} must lie in [0, split_size {split_size})")
        self.dim = dim
        self.num_heads = num_heads
        self.split_size = split_size
        self.shift_size = shift_size
        self.b_idx = b_idx
        self.rg_idx = rg_idx
        self.patches_resolution = reso
        self.branch_num = 2
        # Shifted windows in blocks 2, 6, 10, ... of even groups and 0, 4, 8, ... of odd groups.
        self.shifted = (rg_idx % 2 == 0 and b_idx > 0 and (b_idx - 2) % 4 == 0) or (
            rg_idx % 2 != 0 and b_idx % 4 == 0)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.attns = nn.ModuleList([
            Spatial_Attention(dim // 2, idx=i, split_size=split_size, num_heads=num_heads // 2, dim_out=dim // 2,
                              qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop, position_bias=True)
            for i in range(self.branch_num)])

        if self.shifted:
            mask_0, mask_1 = self.calculate_mask(reso, reso)
            self.register_buffer("attn_mask_0", mask_0)
            self.register_buffer("attn_mask_1", mask_1)
        else:
            self.register_buffer("attn_mask_0", None)
            self.register_buffer("attn_mask_1", None)

        self.dwconv = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim),
            nn.BatchNorm2d(dim),
            nn.GELU())
        self.channel_interaction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim // 8, kernel_size=1),
            nn.BatchNorm2d(dim // 8),
            nn.GELU(),
            nn.Conv2d(dim // 8, dim, kernel_size=1))
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 16, kernel_size=1),
            nn.BatchNorm2d(dim // 16),
            nn.GELU(),
            nn.Conv2d(dim // 16, 1, kernel_size=1))

    def _windows(self) -> tuple[tuple[int, int], tuple[int, int]]:
        s0, s1 = self.split_size[0], self.split_size[1]
        return (s0, s1), (s1, s0)

    def _shifts(self) -> tuple[tuple[int, int], tuple[int, int]]:
        if not self.shifted:
            return (0, 0), (0, 0)
        t0, t1 = self.shift_size[0], self.shift_size[1]
        return (t0, t1), (t1, t0)

    def calculate_mask(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift masks (num_windows, N, N) of both branches for an H x W (padded) map."""
        t0, t1 = self.shift_size[0], self.shift_size[1]
        w0, w1 = self._windows()
        return shift_window_mask((H, W), w0, (t0, t1)), shift_window_mask((H, W), w1, (t1, t0))

    def _masks(self, Hp: int, Wp: int, plan: WindowPlan) -> Sequence[torch.Tensor]:
        if (not torch.compiler.is_exporting() and Hp == self.patches_resolution
                and Wp == self.patches_resolution):  # under export the size is symbolic: always computed
            # the registered buffers are authoritative at the training size (they are in checkpoints)
            return self.attn_mask_0, self.attn_mask_1
        return [plan.mask(w, s, (Hp, Wp)) for w, s in zip(self._windows(), self._shifts())]

    def _indices(self, B: int, Hp: int, Wp: int, heads: int, plan: WindowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        wins, shifts = self._windows(), self._shifts()

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.stack([plan.order(w, s, (Hp, Wp)) for w, s in zip(wins, shifts)])
            H, W = plan.x_size
            return _window_gather_indices(B, H * W, order, wins[0][0] * wins[0][1], heads)
        return plan.memo(("dat_gather", B, (Hp, Wp), wins, shifts, heads), build)

    def forward(self, x: torch.Tensor, H: int, W: int, plan: Optional[WindowPlan] = None) -> torch.Tensor:
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"got {L} tokens for a {H}x{W} map")
        plan = WindowPlan((H, W), x.device) if plan is None else plan
        heads = self.attns[0].num_heads
        head_dim = C // 2 // heads
        # q, k, v are zero-padded right/bottom to a multiple of the longer window side; the padded
        # tokens take part in attention unmasked, as in the official code.
        split = max(self.split_size[0], self.split_size[1])
        Hp, Wp = _pad_to(H, split), _pad_to(W, split)

        qkv = self.qkv(x).view(B * L, 3 * C)
        v = qkv[:, 2 * C:].reshape(B, H, W, C).permute(0, 3, 1, 2)  # for the conv branch, unpadded
        if pad_always() or Hp != H or Wp != W:  # the zero token padding slots read (unread without padding)
            qkv = torch.cat([qkv, qkv.new_zeros(1, 3 * C)])
        into, back = self._indices(B, Hp, Wp, heads, plan)
        qkv = qkv.view(-1, head_dim).index_select(0, into)
        q, k, v_win = qkv.view(3, 2, B, -1, heads, self.split_size[0] * self.split_size[1], head_dim).unbind(0)

        biases = [attn.relative_bias() for attn in self.attns]
        masks = self._masks(Hp, Wp, plan) if self.shifted else None
        out = window_attention(q, k, v_win, self.attns[0].scale, biases, masks, self.attns[0].attn_drop)
        attened_x = out.view(-1, head_dim).index_select(0, back).view(B, L, C)

        conv_x = self.dwconv(v.contiguous(memory_format=torch.channels_last))
        # adaptive interaction: channel gate from the conv branch, spatial gate from the attention branch
        channel_map = self.channel_interaction(conv_x).view(B, 1, C)
        spatial_map = self.spatial_interaction(_tokens_as_image(attened_x, H, W))
        attened_x = attened_x * torch.sigmoid(channel_map)
        conv_x = _image_as_tokens(torch.sigmoid(spatial_map) * conv_x)
        return self.proj_drop(self.proj(attened_x + conv_x))


class Adaptive_Channel_Attention(nn.Module):
    """Channel self-attention (XCiT style, transposed: tokens are the features) plus a depthwise-conv
    branch, joined by the adaptive interaction module."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        # qk_scale is accepted for a uniform signature; the learned temperature replaces it here
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwconv = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim),
            nn.BatchNorm2d(dim),
            nn.GELU())
        self.channel_interaction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim // 8, kernel_size=1),
            nn.BatchNorm2d(dim // 8),
            nn.GELU(),
            nn.Conv2d(dim // 8, dim, kernel_size=1))
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 16, kernel_size=1),
            nn.BatchNorm2d(dim // 16),
            nn.GELU(),
            nn.Conv2d(dim // 16, 1, kernel_size=1))

    def forward(self, x: torch.Tensor, H: int, W: int, plan: Optional[WindowPlan] = None) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.num_heads
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 4, 1).unbind(0)  # each (B, heads, d, N)
        conv_x = self.dwconv(_tokens_as_image(qkv[..., 2 * C:], H, W).contiguous(memory_format=torch.channels_last))

        # q and k are L2-normalised over the tokens. Dividing the small (d x d) product by both norms equals
        # normalising first, and the column sums over the token-major layout are much cheaper than
        # reductions along the strided token axis.
        norms = qkv[..., :2 * C].square().sum(1).sqrt().clamp_min(1e-12).view(B, 2, heads, C // heads)
        attn = (q @ k.transpose(-2, -1)) / (norms[:, 0, :, :, None] * norms[:, 1, :, None, :])
        attn = self.attn_drop((attn * self.temperature).softmax(dim=-1))
        # (N x d) @ (d x d) per head gives token-major rows, so one cheap interleave makes (B, N, C)
        attened_x = (v.transpose(-2, -1) @ attn.transpose(-2, -1)).transpose(1, 2).reshape(B, N, C)

        # adaptive interaction: channel gate from the attention branch, spatial gate from the conv branch
        channel_map = self.channel_interaction(_tokens_as_image(attened_x, H, W))
        spatial_map = _image_as_tokens(self.spatial_interaction(conv_x))
        attened_x = attened_x * torch.sigmoid(spatial_map)
        conv_x = _image_as_tokens(conv_x * torch.sigmoid(channel_map))
        return self.proj_drop(self.proj(attened_x + conv_x))


class DATB(nn.Module):
    """Dual aggregation Transformer block: spatial (even b_idx) or channel (odd b_idx) attention, then SGFN."""

    def __init__(self, dim: int, num_heads: int, reso: int = 64, split_size: Sequence[int] = (2, 4),
                 shift_size: Sequence[int] = (1, 2), expansion_factor: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, rg_idx: int = 0, b_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        if b_idx % 2 == 0:
            self.attn = Adaptive_Spatial_Attention(
                dim, num_heads=num_heads, reso=reso, split_size=split_size, shift_size=shift_size,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, rg_idx=rg_idx, b_idx=b_idx)
        else:
            self.attn = Adaptive_Channel_Attention(
                dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.ffn = SGFN(in_features=dim, hidden_features=int(dim * expansion_factor), out_features=dim,
                        act_layer=act_layer)
        self.norm2 = norm_layer(dim)

    def forward(self, x: torch.Tensor, x_size: Sequence[int], plan: Optional[WindowPlan] = None) -> torch.Tensor:
        H, W = x_size
        x = x + self.drop_path(self.attn(self.norm1(x), H, W, plan))
        return x + self.drop_path(self.ffn(self.norm2(x), H, W))


class ResidualGroup(nn.Module):
    """A stack of DATBs followed by a convolution, with a residual connection around the group."""

    def __init__(self, dim: int, reso: int, num_heads: int, split_size: Sequence[int] = (2, 4),
                 expansion_factor: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_paths: Optional[Sequence[float]] = None,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm,
                 depth: int = 2, use_chk: bool = False, resi_connection: str = "1conv", rg_idx: int = 0) -> None:
        super().__init__()
        self.use_chk = use_chk
        self.reso = reso
        drop_paths = [0.0] * depth if drop_paths is None else drop_paths
        self.blocks = nn.ModuleList([
            DATB(dim=dim, num_heads=num_heads, reso=reso, split_size=split_size,
                 shift_size=[split_size[0] // 2, split_size[1] // 2], expansion_factor=expansion_factor,
                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=drop_paths[i],
                 act_layer=act_layer, norm_layer=norm_layer, rg_idx=rg_idx, b_idx=i)
            for i in range(depth)])
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: Sequence[int], plan: Optional[WindowPlan] = None) -> torch.Tensor:
        H, W = x_size
        plan = WindowPlan((H, W), x.device) if plan is None else plan
        res = x
        for blk in self.blocks:
            if self.use_chk and torch.is_grad_enabled():
                x = checkpoint.checkpoint(blk, x, x_size, plan, use_reentrant=False)
            else:
                x = blk(x, x_size, plan)
        return res + _image_as_tokens(self.conv(_tokens_as_image(x, H, W)))


class _ToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _image_as_tokens(x)


class DAT(nn.Module):
    """Dual Aggregation Transformer (x2/x3/x4 single-image super-resolution).

    Args:
        img_size: training patch size; shifted blocks register their masks for it.
        in_chans: image channels (input and output).
        embed_dim: feature width.
        split_size: spatial window (rows, cols) of branch 0; branch 1 uses the transpose.
        depth: number of blocks in each residual group.
        num_heads: attention heads in each residual group (split evenly between the two spatial branches).
        expansion_factor: SGFN hidden width relative to embed_dim.
        qkv_bias: bias in the q, k, v projections.
        qk_scale: spatial attention scale; head_dim ** -0.5 when None.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (max).
        act_layer, norm_layer: SGFN activation and block normalisation.
        use_chk: gradient checkpointing per block.
        upscale: 2, 3 or 4 (or any power of two with 'pixelshuffle').
        img_range: pixel range the network computes in (1.0 for [0, 1] inputs).
        resi_connection: '1conv' or '3conv' (bottleneck) after each group and the body.
        upsampler: 'pixelshuffle' (classical) or 'pixelshuffledirect' (lightweight).
    """

    def __init__(self,
                 img_size: int = 64,
                 in_chans: int = 3,
                 embed_dim: int = 180,
                 split_size: Sequence[int] = [2, 4],  # list defaults as upstream; never mutated
                 depth: Sequence[int] = [2, 2, 2, 2],
                 num_heads: Sequence[int] = [2, 2, 2, 2],
                 expansion_factor: float = 4.0,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1,
                 act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm,
                 use_chk: bool = False,
                 upscale: int = 2,
                 img_range: float = 1.0,
                 resi_connection: str = "1conv",
                 upsampler: str = "pixelshuffle") -> None:
        super().__init__()
        if upsampler not in ("pixelshuffle", "pixelshuffledirect"):
            raise ValueError(f"upsampler must be 'pixelshuffle' or 'pixelshuffledirect', got {upsampler!r}")
        split_size = list(to_2tuple(split_size))
        num_feat = 64
        self.img_range = img_range
        # a plain attribute, not a buffer: checkpoints do not carry it (forward moves it to the input)
        if in_chans == 3:
            self.mean = torch.tensor((0.4488, 0.4371, 0.4040), device="cpu").view(1, 3, 1, 1)
        else:
            self.mean = torch.zeros(1, 1, 1, 1, device="cpu")
        self.upscale = upscale
        self.upsampler = upsampler

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        self.num_layers = len(depth)
        self.use_chk = use_chk
        self.num_features = self.embed_dim = embed_dim
        self.before_RG = nn.Sequential(_ToTokens(), nn.LayerNorm(embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.layers = nn.ModuleList([
            ResidualGroup(dim=embed_dim, num_heads=num_heads[i], reso=img_size, split_size=split_size,
                          expansion_factor=expansion_factor, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                          attn_drop=attn_drop_rate, drop_paths=dpr[sum(depth[:i]):sum(depth[:i + 1])],
                          act_layer=act_layer, norm_layer=norm_layer, depth=depth[i], use_chk=use_chk,
                          resi_connection=resi_connection, rg_idx=i)
            for i in range(self.num_layers)])
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.upsample = UpsampleOneStep(upscale, embed_dim, in_chans, (img_size, img_size))

        if not self.conv_first.weight.is_meta:  # shape-only (meta) models have no values to initialise
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        plan = WindowPlan((H, W), x.device)  # masks and gather indices for this input size, shared by all blocks
        x = self.before_RG(x)
        for layer in self.layers:
            x = layer(x, (H, W), plan)
        return _tokens_as_image(self.norm(x), H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x)
        # channels-last keeps every feature map token-major, so tokens <-> image views are free
        x = ((x - mean) * self.img_range).contiguous(memory_format=torch.channels_last)
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        if self.upsampler == "pixelshuffle":
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.upsample(x)
        return (x / self.img_range + mean).contiguous()


# --- Variants: name -> (constructor kwargs, the pixel range the released weights compute in) ---------------------
# The released sizes follow options/Test/test_DAT*_x4.yml; small and tiny are this project's CPU and test sizes
# (the lightweight releases' pixelshuffledirect upsampler: a 64-channel x4 upsampler would cost 5x the body).

_BASE = dict(upscale=4, in_chans=3, img_size=64, img_range=1.0, embed_dim=180, num_heads=[6] * 6, depth=[6] * 6,
             expansion_factor=4, resi_connection="1conv", split_size=[8, 32])

VARIANTS: dict[str, tuple[dict, float]] = {
    "dat": (_BASE, 1.0),
    "dat_s": ({**_BASE, "split_size": [8, 16], "expansion_factor": 2}, 1.0),
    "dat_2": ({**_BASE, "split_size": [8, 32], "expansion_factor": 2}, 1.0),
    "dat_light": (dict(upscale=4, in_chans=3, img_size=64, img_range=1.0, depth=[18], embed_dim=60, num_heads=[6],
                       expansion_factor=2, resi_connection="3conv", split_size=[8, 32],
                       upsampler="pixelshuffledirect"), 1.0),
    "dat_small": (dict(upscale=4, in_chans=3, img_size=32, img_range=1.0, split_size=[4, 8], depth=[2, 2],
                       embed_dim=32, num_heads=[2, 2], expansion_factor=2, resi_connection="1conv",
                       upsampler="pixelshuffledirect"), 1.0),
    "dat_tiny": (dict(upscale=4, in_chans=3, img_size=16, img_range=1.0, split_size=[4, 8], depth=[2, 2],
                      embed_dim=64, num_heads=[4, 4], expansion_factor=2, resi_connection="1conv"), 1.0),
}
