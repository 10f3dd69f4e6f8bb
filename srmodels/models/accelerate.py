"""CPU inference accelerator: ``accelerate(model)`` swaps a built model's layers for float32 CPU kernels.

The architectures in ``srmodels.archs`` are plain ports (``nn.Linear``, ``nn.Conv2d``, ``act(fc1(x))``). This
module is the only place that knows about faster CPU kernels, and it applies them explicitly, in place::

    model = accelerate(load_model(path))   # inference
    model = load_model(path)               # the plain port (CLI: --plain)

Every swapped layer is a subclass of the layer it replaces, with the same parameters and buffers under the same
names, so ``state_dict()`` is unchanged and ``load_state_dict`` still works. Its forward takes the fast kernel
only in float32 CPU inference (grad disabled, CPU tensors, float32 input and weight, no autocast, not being
traced by ``torch.compile``) and is the plain layer's forward otherwise, so an accelerated model stays correct
for training, on CUDA, in bf16 and under autocast. Never accelerate for training: it gains nothing there.

Why each kernel exists:

* **Packed linear** (``PackedLinear``): one oneDNN matmul (``mkldnn._linear_pointwise``) on a weight reordered
  once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``). ``F.linear`` (``addmm``) first copies
  the broadcast bias into the whole output, a full extra write pass, and reorders the weight on every call;
  the packed matmul adds the bias as it writes (SwinIR-M at 120x84: 3% less time per forward).
* **Linear + GELU** (``PackedLinearGELU``): fc1 with exact GELU applied as the matmul writes its output, which
  spares a full read/write pass over the widest activation of every transformer MLP. The module computes
  ``gelu(fc1(x))``; the ``act`` it absorbed becomes ``nn.Identity``.
* **Linear + residual add** (``PackedLinear.forward_add``): the residual added by the matmul as it writes its
  output. Used by ``_SwinBlock`` for the two residual adds of each SwinIR block (attention projection, fc2).
* **Winograd F(4x4, 3x3)** (``WinogradConv2d``): wide 3x3 convolutions (both sides >= 64 channels, one >= 128)
  with 36 multiplies per 4x4 output tile and channel pair instead of 144; about 0.6x the time of oneDNN's direct
  conv for 180->180 (AVX2, 2 threads). Its rounding is 2-3x the direct conv's (about 2e-5 on unit-variance
  features), well inside the conformance tolerance.
* **Direct conv on a packed weight** (``DirectConv2d``): oneDNN's convolution with the weight reordered once
  (``mkldnn._reorder_convolution_weight`` + ``_convolution_pointwise``): 3% less time per RRDBNet forward.

Derived weights (packed or Winograd-transformed) are cached per module and kind and keyed by the weight's
identity, storage and version counter, so an optimizer step, ``load_state_dict`` or a replaced parameter makes
them be derived again on next use; the cache never serves a stale weight.

Which layer gets which kernel (``_plan``), by explicit rules:

1. Every ``nn.Linear`` with ``in_features >= 16`` is packed. Narrower ones (DAT's position-bias MLPs, 2-11
   inputs, evaluated once per block on a few hundred rows) stay plain: packing buys nothing there.
2. A module with children ``fc1`` (a linear of rule 1) and ``act`` (exact ``nn.GELU``), the timm ``Mlp``
   convention whose forward is ``act(fc1(x))``, gets fc1 + GELU fused and ``act`` replaced by ``nn.Identity``.
3. SwinIR blocks (``SwinTransformerBlock``) add each branch's residual inside the matmul that ends the branch
   (rule 1 packs those matmuls), while stochastic depth is inactive (eval mode).
4. In DAT and SwinIR, the full-width convs feeding residual adds (``layers[i].conv`` and ``conv_after_body``
   when a single conv, i.e. ``resi_connection='1conv'``) and the pixel-shuffle head (``conv_before_upsample[0]``
   and the convs of an ``Upsample``) run by Winograd when wide enough (3x3, stride 1, padding 1, no dilation or
   groups, ``min(in, out) >= 64`` and ``max(in, out) >= 128``), else as direct convs on packed weights. Their
   other convs (3-channel first/last convs, depthwise and 1x1 gates, the '3conv' bottleneck, the lightweight
   one-step upsampler) stay plain: small, memory-bound or not measured to gain.
5. In RRDBNet every conv is a direct conv on a packed weight, never Winograd: only conv5 of each dense block is
   wide enough, and it gained 2% for 2-3x the rounding error.
6. Anything else (RFDN, the fusion nets) stays plain.

Where the running torch lacks a private oneDNN op, ``accelerate`` logs one line and leaves the layers that need
it plain (Winograd needs none). The ops are those of torch 2.13, the release this project is tested with.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from srmodels.archs.dat import DAT
from srmodels.archs.rrdbnet import RRDBNet
from srmodels.archs.swinir import SwinIR, SwinTransformerBlock, Upsample  # DAT's Upsample too

__all__ = ["accelerate", "PackedLinear", "PackedLinearGELU", "DirectConv2d", "WinogradConv2d",
           "winograd_conv3x3", "winograd_weight", "toom_cook_matrices", "derived_weight"]

log = logging.getLogger(__name__)


def _onednn_op(name: str):
    """torch.ops.mkldnn.<name>, or None on a torch build without it (``accelerate`` then steps aside)."""
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return None


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
# Rule 1: narrower linears stay plain.
_PACK_MIN_IN_FEATURES = 16


# --- derived-weight cache --------------------------------------------------------------------------------------


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


# Inference-only forms of weights, per module and kind, dropped with the module. A weight replaced, reloaded or
# updated in place (optimizer step, load_state_dict: both bump its version) is transformed again on next use.
# In-place writes through ``.data`` bypass the version counter (as they bypass autograd's checks); use
# torch.no_grad() for in-place edits.
_DERIVED: weakref.WeakKeyDictionary[nn.Module, dict[str, _Derived]] = weakref.WeakKeyDictionary()


def derived_weight(module: nn.Module, kind: str, weight: torch.Tensor,
                   make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(weight)``, computed once per module, ``kind`` and weight version.

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


def _fast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where the kernels apply: training keeps autograd's ops, CUDA/bf16/autocast have their own kernels, and
    torch.compile traces the plain layers (it cannot trace the oneDNN ops)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


# --- linear layers ---------------------------------------------------------------------------------------------


def _linear_ops() -> bool:
    return _LINEAR_POINTWISE is not None and _REORDER_LINEAR_WEIGHT is not None


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference is one oneDNN matmul on a once-packed weight (rule 1)."""

    def _packed(self) -> torch.Tensor:
        return derived_weight(self, "onednn", self.weight,
                              lambda w: _REORDER_LINEAR_WEIGHT(w.contiguous(), _PACK_ROWS_HINT))

    def _use_packed(self, x: torch.Tensor) -> bool:
        return _linear_ops() and _fast(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_packed(x):
            return _LINEAR_POINTWISE(x, self._packed(), self.bias, "none", [], "")
        return super().forward(x)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``self(x) + residual`` (residual shaped like the output), the add done by the matmul as it writes."""
        if self._use_packed(x):
            return _LINEAR_POINTWISE.binary(x, residual, self._packed(), self.bias, "add")
        return self(x) + residual


class PackedLinearGELU(PackedLinear):
    """``gelu(linear(x))`` (exact GELU) in one module: fc1 with the activation it absorbed (rule 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_packed(x):
            return _LINEAR_POINTWISE(x, self._packed(), self.bias, "gelu", [], "none")
        return F.gelu(F.linear(x, self.weight, self.bias))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the GELU comes after the matmul; add the residual to the output instead")


# --- SwinIR blocks: residual adds inside the matmuls -----------------------------------------------------------


class _SwinBlock(SwinTransformerBlock):
    """SwinIR block (rule 3) whose two residual adds happen in the packed matmuls ending each branch.

    Same computation as ``SwinTransformerBlock.forward``; in training mode (stochastic depth, dropout) it is that
    forward. ``forward_add`` falls back to ``linear(x) + residual`` wherever the packed kernel does not apply.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn, mlp = self.attn, self.mlp
        if (self.training or torch.compiler.is_exporting() or not isinstance(attn.proj, PackedLinear)
                or not isinstance(mlp.fc2, PackedLinear)):  # export: the plain block's graph
            return super().forward(x, mask)
        b, length, c = x.shape
        n = self.window_size * self.window_size
        # WindowAttention.forward up to its output projection (dropouts are identities in eval mode)
        y = self.norm1(x).view(-1, n, c)
        qkv = attn.qkv(y).view(y.shape[0], n, 3, attn.num_heads, c // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = attn.relative_position_bias().unsqueeze(0)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)
            if y.shape[0] != mask.shape[0]:
                bias = bias.repeat(y.shape[0] // mask.shape[0], 1, 1, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=attn.scale)
        y = y.transpose(1, 2).reshape(-1, n, c)
        x = attn.proj.forward_add(y, x.view(-1, n, c)).view(b, length, c)
        return mlp.fc2.forward_add(mlp.act(mlp.fc1(self.norm2(x))), x)


# --- Winograd F(4x4, 3x3) --------------------------------------------------------------------------------------

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


# --- convolutions ----------------------------------------------------------------------------------------------


def _conv_ops() -> bool:
    return _CONV_POINTWISE is not None and _REORDER_CONV_WEIGHT is not None


def _winograd_applies(conv: nn.Conv2d) -> bool:
    """Rule 4's shape test: a 3x3 'same' conv, wide on both sides."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= _WINOGRAD_MIN_CHANNELS
            and max(conv.in_channels, conv.out_channels) >= _WINOGRAD_MIN_WIDEST)


class DirectConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose float32 CPU inference is one oneDNN convolution on a once-packed weight (rules 4, 5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _conv_ops() and x.dim() == 4 and _fast(x, self.weight):
            geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            hint = [1, self.in_channels, _PACK_SIDE_HINT, _PACK_SIDE_HINT]
            weight = derived_weight(self, "onednn", self.weight,
                                    lambda w: _REORDER_CONV_WEIGHT(w.contiguous(), *geometry, hint))
            return _CONV_POINTWISE(x, weight, self.bias, *geometry, "none", [], "")
        return super().forward(x)


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (a wide 3x3 'same' conv) run by Winograd F(4x4, 3x3) in float32 CPU inference (rule 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and _fast(x, self.weight):
            return winograd_conv3x3(x, self.weight, self.bias,
                                    derived_weight(self, "winograd", self.weight, winograd_weight))
        return super().forward(x)


# --- the plan --------------------------------------------------------------------------------------------------

_ACCELERATED = (PackedLinear, DirectConv2d, WinogradConv2d, _SwinBlock)


def _transformer_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Rule 4's convs of a DAT or SwinIR."""
    convs = [layer.conv for layer in model.layers if isinstance(layer.conv, nn.Conv2d)]
    if isinstance(model.conv_after_body, nn.Conv2d):
        convs.append(model.conv_after_body)
    before = getattr(model, "conv_before_upsample", None)
    if before is not None:
        convs.append(before[0])
    if isinstance(getattr(model, "upsample", None), Upsample):
        convs += [m for m in model.upsample if isinstance(m, nn.Conv2d)]
    return convs


def _plan(model: nn.Module) -> dict[nn.Module, type[nn.Module]]:
    """Module -> the accelerated class it becomes (rules 1-6 of the module docstring)."""
    plan: dict[nn.Module, type[nn.Module]] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.in_features >= _PACK_MIN_IN_FEATURES:  # rule 1
            plan.setdefault(m, PackedLinear)
        fc1, act = getattr(m, "fc1", None), getattr(m, "act", None)
        if (isinstance(fc1, nn.Linear) and fc1.in_features >= _PACK_MIN_IN_FEATURES and type(act) is nn.GELU
                and act.approximate == "none"):  # rule 2
            plan[fc1] = PackedLinearGELU
        if type(m) is SwinTransformerBlock:  # rule 3
            plan[m] = _SwinBlock
        if isinstance(m, (DAT, SwinIR)):  # rule 4
            for conv in _transformer_convs(m):
                plan[conv] = WinogradConv2d if _winograd_applies(conv) else DirectConv2d
        elif isinstance(m, RRDBNet):  # rule 5
            for conv in m.modules():
                if isinstance(conv, nn.Conv2d):
                    plan[conv] = DirectConv2d
    return plan


_STEPPED_ASIDE: set[str] = set()  # missing ops already reported in this process


def _step_aside(missing: list[str], kernels: list[str]) -> None:
    """One log line (once per process) naming the missing ops and the layers that therefore stay plain."""
    key = ",".join(missing)
    if key not in _STEPPED_ASIDE:
        _STEPPED_ASIDE.add(key)
        log.warning("torch %s lacks torch.ops.mkldnn.%s: %s stay plain", torch.__version__,
                    ", ".join(missing), " and ".join(kernels))


def accelerate(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Swap ``model``'s layers in place for float32 CPU inference kernels (see the module docstring) and return it.

    ``state_dict`` keys and values are unchanged; every swapped layer computes the plain layer's result wherever
    its kernel does not apply (training, non-CPU, non-float32, autocast). ``enabled=False`` returns the model
    untouched (the plain port), for callers with a ``--plain`` switch. Calling it twice changes nothing more.
    """
    if not enabled:
        return model
    plan = _plan(model)
    missing_linear = [n for n, op in (("_linear_pointwise", _LINEAR_POINTWISE),
                                      ("_reorder_linear_weight", _REORDER_LINEAR_WEIGHT)) if op is None]
    missing_conv = [n for n, op in (("_convolution_pointwise", _CONV_POINTWISE),
                                    ("_reorder_convolution_weight", _REORDER_CONV_WEIGHT)) if op is None]
    missing, kernels = [], []
    if missing_linear and any(issubclass(cls, (PackedLinear, _SwinBlock)) for cls in plan.values()):
        missing, kernels = missing + missing_linear, kernels + ["linear layers"]
        plan = {m: cls for m, cls in plan.items() if not issubclass(cls, (PackedLinear, _SwinBlock))}
    if missing_conv and DirectConv2d in plan.values():
        missing, kernels = missing + missing_conv, kernels + ["direct convolutions"]
        plan = {m: cls for m, cls in plan.items() if cls is not DirectConv2d}
    if missing:
        _step_aside(missing, kernels)
    fused = {fc1 for fc1, cls in plan.items() if cls is PackedLinearGELU}
    for m in list(model.modules()):
        if isinstance(m, _ACCELERATED):
            continue
        if getattr(m, "fc1", None) in fused and not isinstance(m.fc1, _ACCELERATED):
            m.act = nn.Identity()  # fc1 applies it now
        if m in plan:
            m.__class__ = plan[m]
    return model
