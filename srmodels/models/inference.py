"""Model-agnostic inference helpers: x8 geometric self-ensemble and overlapping tiled forward.

A "model" here is any callable mapping a (B, 3, h, w) tensor to (B, 3, h*scale, w*scale) (an ``nn.Module`` in
eval mode, a lambda, or another helper from this module), so the helpers compose:
``upscale(model, x, 4, self_ensemble=True, tile=128)`` runs the ensemble over a tiled forward.

Conventions: tensors are NCHW; the input and the model live on the same device; the helpers neither change
the model's mode nor clamp outputs.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]

# (quarter turns, horizontal flip). Grouped so that the four that keep (h, w) come first and the four that
# swap it to (w, h) follow: the batched path runs each group as one call, and both paths sum in this same
# order, so they differ only by the model's own batch-size numerics.
TRANSFORMS: tuple[tuple[int, bool], ...] = (
    (0, False), (2, False), (0, True), (2, True),
    (1, False), (3, False), (1, True), (3, True),
)


def apply_transform(x: torch.Tensor, rot: int, flip: bool) -> torch.Tensor:
    """Flip the last axis (if ``flip``), then rotate the last two axes by ``rot`` quarter turns."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, rot, dims=(-2, -1))


def invert_transform(y: torch.Tensor, rot: int, flip: bool) -> torch.Tensor:
    """Exact inverse of :func:`apply_transform` (undo the rotation, then the flip); always new memory."""
    if rot % 4 == 0 and not flip:
        return y.clone()
    y = torch.rot90(y, -rot, dims=(-2, -1))
    if flip:
        y = y.flip(-1)
    return y


def _check_nchw(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums of several outputs lose bits (bf16 has an ulp of 1/16 at 8): sum in float32 and
    # cast back at the end; full-precision outputs accumulate in their own dtype.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _accumulate(acc: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    # y comes from invert_transform, always fresh memory, so it can become the accumulator itself; adding in
    # place saves a full output buffer and is fine for autograd (addition saves nothing for backward).
    if acc is None:
        return y.to(_accumulator_dtype(y.dtype))
    return acc.add_(y)


def self_ensemble(model: Model, x: torch.Tensor, *, batch_transforms: bool | None = None) -> torch.Tensor:
    """x8 geometric self-ensemble: mean over 4 rotations x {no flip, flip} of the inverse-mapped outputs.

    Args:
        model: callable (B, C, h, w) -> (B, C', h*s, w*s).
        x: (B, C, h, w) input; every image of the batch is ensembled independently.
        batch_transforms: run the transforms that share a shape as one model call (square input: one call on
            8B images; otherwise two calls on 4B). ``None`` means "only off the CPU", where the larger batch
            buys throughput; on CPU it only multiplies peak memory, so one transform at a time is the default.

    Returns:
        The averaged output; costs exactly 8 forwards' worth of pixels either way.
    """
    _check_nchw(x)
    if batch_transforms is None:
        batch_transforms = x.device.type != "cpu"
    acc: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    if not batch_transforms:
        for rot, flip in TRANSFORMS:
            y = model(apply_transform(x, rot, flip))
            out_dtype = y.dtype
            acc = _accumulate(acc, invert_transform(y, rot, flip))
            del y
    else:
        square = x.shape[-1] == x.shape[-2]
        groups = [TRANSFORMS] if square else [TRANSFORMS[:4], TRANSFORMS[4:]]
        b = x.shape[0]
        for group in groups:
            out = model(torch.cat([apply_transform(x, rot, flip) for rot, flip in group], dim=0))
            if out.shape[0] != b * len(group):
                raise ValueError(f"model returned batch {out.shape[0]} for an input batch of {b * len(group)}")
            out_dtype = out.dtype
            for (rot, flip), chunk in zip(group, out.split(b, dim=0)):
                acc = _accumulate(acc, invert_transform(chunk, rot, flip))
            del out
    assert acc is not None and out_dtype is not None
    # Division by a power of two: exact, so an equivariant model's output comes back unchanged.
    return (acc / len(TRANSFORMS)).to(out_dtype)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride``, the last one shifted back so it ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _windows(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Per-axis (window start, window size, kept start, kept end) of a tiled forward.

    Cores of ``tile`` pixels cover the axis (the last shifted back inside). Each model call sees its core
    plus ``overlap`` pixels of real context on either side (the window is shifted inside the image rather
    than padded, so every call has the same size), and keeps its core widened by ``overlap // 2`` towards
    its neighbours, so neighbouring outputs overlap and are averaged.
    """
    win = min(tile + 2 * overlap, length)
    margin = overlap // 2
    out = []
    for c0 in tile_starts(length, min(tile, length), tile):
        c1 = min(c0 + tile, length)
        w0 = min(max(c0 - overlap, 0), length - win)
        k0 = max(c0 - margin, w0) if c0 > 0 else 0
        k1 = min(c1 + margin, w0 + win) if c1 < length else length
        out.append((w0, win, k0, k1))
    return out


def tiled_forward(model: Model, x: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Run ``model`` tile by tile with ``overlap`` LR pixels of context around each tile, blending the seams.

    Each call sees a ``tile + 2 * overlap`` window (clipped to the image; edge windows shifted inside, never
    padded, so all calls have one size) and contributes its ``tile`` core plus ``overlap // 2`` pixels towards
    each neighbour; where contributions overlap they are averaged (sum / per-pixel count). A model whose
    receptive-field radius is at most ``overlap // 2`` therefore gives the untiled result up to float rounding.
    Models with wide context (RFDN's ESA pools over the whole input, transformers attend across windows) see
    at least ``tile + overlap`` pixels per call, which is what keeps tiling within a few hundredths of a dB.

    If the tile covers the whole image the model is called once on ``x`` itself: bit-identical to untiled.
    Only one window's activations exist at a time; the output accumulator lives on ``x.device``.
    """
    _check_nchw(x)
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    h, w = x.shape[-2:]
    if tile >= h and tile >= w:
        return model(x)

    rows, cols = _windows(h, tile, overlap), _windows(w, tile, overlap)
    logger.debug("tiled forward: %dx%d input, %d x %d windows", h, w, len(rows), len(cols))
    # Kept regions form a grid (row range x column range): the per-pixel count is an outer product.
    count_y = torch.zeros(h * scale, device=x.device)
    count_x = torch.zeros(w * scale, device=x.device)
    for _, _, k0, k1 in rows:
        count_y[k0 * scale : k1 * scale] += 1
    for _, _, k0, k1 in cols:
        count_x[k0 * scale : k1 * scale] += 1

    acc: torch.Tensor | None = None
    out_dtype = x.dtype
    for y0, th, r0, r1 in rows:
        for x0, tw, c0, c1 in cols:
            out = model(x[..., y0 : y0 + th, x0 : x0 + tw])
            if out.ndim != 4 or out.shape[0] != x.shape[0] or tuple(out.shape[-2:]) != (th * scale, tw * scale):
                raise ValueError(
                    f"model mapped a {th}x{tw} tile to shape {tuple(out.shape)}; expected "
                    f"({x.shape[0]}, C, {th * scale}, {tw * scale}) for scale {scale}"
                )
            if acc is None:
                out_dtype = out.dtype
                acc = torch.zeros(
                    (x.shape[0], out.shape[1], h * scale, w * scale),
                    dtype=_accumulator_dtype(out.dtype),
                    device=x.device,
                )
            kept = out[..., (r0 - y0) * scale : (r1 - y0) * scale, (c0 - x0) * scale : (c1 - x0) * scale]
            region = (..., slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale))
            # In-place on a slice is fine for autograd too: addition saves nothing for backward.
            acc[region] += kept.to(acc.device)
            del out, kept
    assert acc is not None
    count = (count_y[:, None] * count_x[None, :]).to(acc.dtype)
    return (acc / count).to(out_dtype)


_self_ensemble = self_ensemble  # upscale's `self_ensemble` flag shadows the function inside it


def upscale(
    model: Model,
    x: torch.Tensor,
    scale: int,
    self_ensemble: bool = False,
    tile: int | None = None,
    tile_overlap: int = 16,
    *,
    batch_transforms: bool | None = None,
) -> torch.Tensor:
    """Super-resolve ``x`` (B, C, h, w) -> (B, C', h*scale, w*scale), optionally ensembled and/or tiled.

    Args:
        model: callable (B, C, h, w) -> (B, C', h*scale, w*scale), already in eval mode and on x's device.
        x: input batch; its value range is whatever the model expects (e.g. 0-255 for RFDN_AIM).
        scale: the model's upscaling factor (checked against the output shape).
        self_ensemble: average the x8 geometric self-ensemble (see :func:`self_ensemble`).
        tile: LR tile size for :func:`tiled_forward`; ``None`` runs the whole image at once. With the ensemble,
            each transformed image is tiled.
        tile_overlap: LR pixels of context around each tile (see :func:`tiled_forward`).
        batch_transforms: forwarded to :func:`self_ensemble`.

    Runs under ``torch.inference_mode()`` unless gradients are wanted (grad mode on and ``x.requires_grad``).
    The result is then an inference tensor: ``.clone()`` it outside inference mode before using it as an
    input of an autograd graph (e.g. as a fixed input while training a fusion net).
    """
    _check_nchw(x)

    def forward(t: torch.Tensor) -> torch.Tensor:
        return model(t) if tile is None else tiled_forward(model, t, scale, tile, tile_overlap)

    grad_wanted = torch.is_grad_enabled() and x.requires_grad
    with contextlib.nullcontext() if grad_wanted else torch.inference_mode():
        out = _self_ensemble(forward, x, batch_transforms=batch_transforms) if self_ensemble else forward(x)
    expected = (x.shape[0], x.shape[2] * scale, x.shape[3] * scale)
    if out.ndim != 4 or (out.shape[0], out.shape[2], out.shape[3]) != expected:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match input {tuple(x.shape)} x{scale}")
    return out
