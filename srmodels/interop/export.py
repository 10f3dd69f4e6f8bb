"""Writing a checkpoint in other formats: safetensors (ours, self-describing), the official layouts, ONNX.

``srmodels export WEIGHTS --to {safetensors,official,onnx} -o OUT`` calls these functions; every checkpoint
:func:`srmodels.models.model.load_model` reads (ours, released, any wrapping, ``.pth`` or ``.safetensors``) can be
exported, and the fusion net's ``best.pth`` too.

* ``safetensors``: the tensors plus our description (arch, variant, kwargs, scale, input range, provenance) as
  safetensors metadata, so the file rebuilds its model alone (no ``--arch``) and loads without unpickling.
* ``official``: what the upstream code and spandrel-style loaders take: ``{'params': state_dict}`` for DAT,
  SwinIR and RRDBNet (BasicSR's layout, on [0, 1] inputs), RFDN's bare state dict on the 0-255 pixel scale its
  official test script feeds, team 27's ``{'weight_net_state_dict': ...}`` for the fusion net. Key names are
  already the upstream ones (the ports keep them).
* ``onnx``: the plain port (the CPU kernels of :mod:`srmodels.models.accelerate` step aside while exporting) traced by
  ``torch.export`` with symbolic height and width, opset >= 17, RGB in [0, 1] in and out whatever the weights'
  input range. The file is kept only after onnxruntime reproduced PyTorch on two input sizes within
  ``tolerance`` (max absolute difference, on the [0, 1] output scale).

Every format checks its output path first (not a folder, no file in its way, a folder this process can write),
before reading the checkpoint, and writes a temporary file renamed into place: a failure leaves no partial file.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srmodels.models.checkpoint import checkpoint_meta, read_checkpoint, save_safetensors, save_torch
from srmodels.core.errors import UserError
from srmodels.models.fusion import fuse, fusion_kind, load_fusion
from srmodels.models.model import SRModel, load_model
from srmodels.core.files import atomic, check_output_file

__all__ = ["FORMATS", "ExportError", "OnnxCheck", "export_safetensors", "export_official", "export_onnx",
           "official_state", "ONNX_TOLERANCE", "ONNX_OPSET", "ONNX_MIN_SIDE"]

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "official", "onnx")
# opset 18 is the lowest the torch.export-based exporter of torch 2.13 writes; the graphs need >= 17.
ONNX_OPSET = 18
_MIN_OPSET = 17
# onnxruntime against PyTorch, max |difference| on the [0, 1] output scale: 1e-4 is 1/39 of an 8-bit level, so
# the exported graph gives the same 8-bit image to within one level; tiny float32 models measure ~3e-7.
ONNX_TOLERANCE = 1e-4
# Smallest LR side the exported graph is traced for: RFDN needs 15 (its ESA pools 7x7 at half resolution), SwinIR's
# reflect padding needs a side above its padding; 16 covers every variant.
ONNX_MIN_SIDE = 16
# The two LR sizes the graph is checked at: neither a multiple of the windows (8, 16, 32), not square, and not the
# size it was traced at (so a graph fixed to the trace size fails the check).
_TRACE_SIZE = (20, 28)
_CHECK_SIZES = ((23, 37), (41, 30))


class ExportError(UserError):
    """A checkpoint that cannot be written in the requested format (the message says why)."""


# --- what a checkpoint holds -----------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """A checkpoint rebuilt: the module, its kind and our description of it."""

    module: nn.Module
    kind: str                 # 'backbone' or 'fusion'
    meta: dict[str, Any]      # our description (save_checkpoint's fields); built for released weights
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(weights: str | Path, variant: str | None) -> _Loaded:
    """A backbone (any checkpoint ``load_model`` reads) or our fusion net checkpoint, plain (never accelerated)."""
    weights = Path(weights)
    meta = checkpoint_meta(read_checkpoint(weights))
    if fusion_kind(meta) is not None:
        net, meta = load_fusion(weights)
        return _Loaded(net, "fusion", meta, dict(net.state_dict()))
    model = load_model(weights, variant)
    if meta is None:  # released weights: describe them now, naming where they came from
        meta = {**model.describe(), "step": 0, "epoch": 0,
                "provenance": {"source": weights.name, "source_sha256": _sha256(weights)}}
    return _Loaded(model, "backbone", meta, dict(model.net.state_dict()))


def _check_output(out: str | Path, suffix: str | None = None) -> Path:
    """The file to write, checked before any work: not a folder, no file in its path, and files can be made in
    its folder (or the folder can be made); each a one-line error. Nothing is made yet (:func:`_written`)."""
    out = check_output_file(out, "export (-o)", ExportError)
    if suffix is not None and out.suffix.lower() != suffix:
        log.warning("%s: written as %s despite its name", out, suffix)
    return out


@contextlib.contextmanager
def _written(out: Path) -> Iterator[None]:
    """Make ``out``'s folder; on failure remove the folders made for it, and make an ``OSError`` one line.

    The writers inside write ``out`` atomically (:func:`srmodels.core.files.atomic`): nothing new is left, and
    an existing ``out`` stays as it was.
    """
    made = [p for p in out.parents if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{out.parent}: cannot make the output folder ({err.strerror or err})") from None
    try:
        yield
    except BaseException as err:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):  # the folder changed since the check, or the disk is full
            raise ExportError(f"{out}: cannot write the export ({err.strerror or err})") from None
        raise


# --- safetensors -----------------------------------------------------------------------------------------------


def export_safetensors(weights: str | Path, out: str | Path, *, variant: str | None = None) -> Path:
    """``weights`` as safetensors with our description in its metadata; :func:`load_model` needs no variant."""
    from safetensors import SafetensorError

    out = _check_output(out, ".safetensors")
    loaded = _load(weights, variant)
    with _written(out):
        try:
            save_safetensors(out, loaded.state_dict, meta=loaded.meta)
        except SafetensorError as err:  # what its writer raises for an I/O error
            raise ExportError(f"{out}: cannot write the export ({' '.join(str(err).split())})") from None
    log.info("%s -> %s (%s, safetensors with its description)", weights, out, loaded.meta.get("variant")
             or loaded.meta["arch"])
    return out


# --- official layouts ------------------------------------------------------------------------------------------

# The official RFDN test script feeds 0-255 pixels and writes its output on that scale.
_RFDN_OFFICIAL_RANGE = 255.0


def _rfdn_state_for_range(model: SRModel) -> dict[str, torch.Tensor]:
    """RFDN's weights on the official 0-255 scale.

    Our model computes ``net(x * r) / r`` on [0, 1] pixels x (r: its input range). Fed X = 255 x, the official
    code computes ``net'(X)``; with s = r / 255 the two agree when ``net'(X) = net(s X) / s``. RFDN's input
    reaches the network only through ``fea_conv`` (the one global skip adds ``fea_conv``'s output, not the
    input) and its output is ``upsampler[0]``'s convolution, pixel-shuffled. So scaling ``fea_conv``'s weight by
    s and ``upsampler[0]``'s weight and bias by 1/s gives exactly ``net(s X) / s``, up to float rounding.
    """
    state = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    s = model.input_range / _RFDN_OFFICIAL_RANGE
    if s != 1.0:
        state["fea_conv.weight"] = state["fea_conv.weight"] * s
        state["upsampler.0.weight"] = state["upsampler.0.weight"] / s
        state["upsampler.0.bias"] = state["upsampler.0.bias"] / s
    return state


def official_state(weights: str | Path, *, variant: str | None = None) -> dict[str, Any]:
    """The object the official code loads for this checkpoint (see the module docstring)."""
    loaded = _load(weights, variant)
    if loaded.kind == "fusion":
        if loaded.meta["arch"] != "fusion_pixel":
            raise ExportError(f"{weights}: only the per-pixel fusion net has an official layout (team 27's); "
                              f"this is {loaded.meta['arch']}")
        if loaded.meta["kwargs"].get("head", "softmax") != "softmax":
            raise ExportError(f"{weights}: team 27's layout holds their softmax head only; this net has the "
                              f"{loaded.meta['kwargs']['head']} head (export it --to safetensors or onnx)")
        return {"weight_net_state_dict": {k: v.detach().clone() for k, v in loaded.state_dict.items()}}
    model: SRModel = loaded.module
    if model.arch == "rfdn":
        return _rfdn_state_for_range(model)
    if model.input_range != 1.0:
        # DAT and SwinIR subtract a mean before their first conv and add it back after the last, so an input scale
        # does not fold into their weights exactly; none of our variants of these has one.
        raise ExportError(f"{weights}: {model.arch} trained on pixel range 0-{model.input_range:g}; the official "
                          f"{model.arch} code feeds 0-1, and this scale does not fold into its weights exactly")
    return {"params": {k: v.detach().clone() for k, v in model.net.state_dict().items()}}


def export_official(weights: str | Path, out: str | Path, *, variant: str | None = None) -> Path:
    """Write :func:`official_state` with ``torch.save`` (what the official test scripts ``torch.load``)."""
    out = _check_output(out)
    state = official_state(weights, variant=variant)
    with _written(out):
        save_torch(out, state)
    log.info("%s -> %s (official layout: %s)", weights, out,
             "bare state dict, 0-255" if "params" not in state and "weight_net_state_dict" not in state
             else next(iter(state)))
    return out


# --- ONNX ------------------------------------------------------------------------------------------------------


class _FusedPixel(nn.Module):
    """The per-pixel fusion as one graph: member outputs (B, 3N, H, W) -> fused image and the weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, member_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.net(member_outputs)
        return fuse(member_outputs, weights), weights


class _FusedImage(nn.Module):
    """The per-image fusion: member outputs (B, 3N, H, W) and the LR image (B, 3, h, w) -> fused image and weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, member_outputs: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.net(lr)
        return fuse(member_outputs, weights), weights


@dataclass
class OnnxCheck:
    """What the onnxruntime check measured: per input, the size checked and the max |ORT - PyTorch|."""

    path: Path
    opset: int
    inputs: list[str]
    outputs: list[str]
    sizes: list[tuple[int, int]]
    max_abs_diff: list[float]
    tolerance: float

    def summary(self) -> str:
        diffs = ", ".join(f"LR {h}x{w}: {d:.2e}" for (h, w), d in zip(self.sizes, self.max_abs_diff))
        return (f"{self.path}: opset {self.opset}, dynamic height/width; onnxruntime vs PyTorch max |diff| "
                f"{diffs} (tolerance {self.tolerance:g})")


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"--to onnx needs the onnx extra (pip install -e '.[onnx]'): {err}") from None
    return onnx, onnxruntime


# The exporter's own loggers report every optimisation pass at INFO and torchvision's absence as a warning; while
# exporting they are raised to ERROR so that the command's output is its result.
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's concern
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _graph_and_inputs(loaded: _Loaded, size: tuple[int, int], seed: int
                      ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """The module to export, example inputs at LR ``size`` and the graph's input and output names."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    if loaded.kind == "backbone":
        return loaded.module, (torch.rand(1, 3, h, w, generator=gen),), ["input"], ["output"]
    n = loaded.module.num_members
    scale = int(loaded.meta["scale"])
    member_outputs = torch.rand(1, 3 * n, h * scale, w * scale, generator=gen)
    if loaded.meta["arch"] == "fusion_pixel":
        return _FusedPixel(loaded.module), (member_outputs,), ["members"], ["fused", "weights"]
    lr = torch.rand(1, 3, h, w, generator=gen)
    return _FusedImage(loaded.module), (member_outputs, lr), ["members", "lr"], ["fused", "weights"]


def _dynamic_shapes(loaded: _Loaded) -> tuple[dict[int, Any], ...]:
    from torch.export import Dim

    height, width = Dim("height", min=ONNX_MIN_SIDE), Dim("width", min=ONNX_MIN_SIDE)
    if loaded.kind == "backbone":
        return ({2: height, 3: width},)
    # The fusion nets are convolutions and a broadcast: any member size works, tied to the LR size or not.
    sr = {2: Dim("sr_height", min=ONNX_MIN_SIDE), 3: Dim("sr_width", min=ONNX_MIN_SIDE)}
    return (sr,) if loaded.meta["arch"] == "fusion_pixel" else (sr, {2: height, 3: width})


def export_onnx(weights: str | Path, out: str | Path, *, variant: str | None = None, opset: int = ONNX_OPSET,
                tolerance: float = ONNX_TOLERANCE, check_sizes: tuple[tuple[int, int], ...] = _CHECK_SIZES
                ) -> OnnxCheck:
    """Export the plain model with symbolic height and width, then check it with onnxruntime.

    Backbones: ``input`` (B=1, 3, H, W) RGB in [0, 1] -> ``output`` (1, 3, sH, sW) on the [0, 1] scale
    (not clamped), the input range applied inside. Fusion nets: ``members`` (1, 3N, sH, sW) (the members'
    outputs, concatenated on channels, as :func:`srmodels.models.fusion.fuse` takes them; the image kind also ``lr``)
    -> ``fused`` and ``weights``. The file is written only when onnxruntime matches PyTorch at every size in
    ``check_sizes`` (LR sides >= ``ONNX_MIN_SIDE``) within ``tolerance``; a mismatch raises AssertionError (a
    bug in the export, not in the user's input) and leaves nothing behind.
    """
    if opset < _MIN_OPSET:
        raise ExportError(f"opset {opset}: the export needs opset >= {_MIN_OPSET}")
    if any(min(size) < ONNX_MIN_SIDE for size in check_sizes) or len(check_sizes) < 2:
        raise ExportError(f"check sizes {check_sizes}: need two or more, sides >= {ONNX_MIN_SIDE}")
    out = _check_output(out, ".onnx")
    onnx, ort = _onnx_modules()
    loaded = _load(weights, variant)
    graph, example, input_names, output_names = _graph_and_inputs(loaded, _TRACE_SIZE, seed=0)
    graph.eval()
    with _written(out), atomic(out) as tmp:
        with _quiet_exporter():
            torch.onnx.export(graph, example, str(tmp), dynamo=True, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_shapes=_dynamic_shapes(loaded),
                              external_data=False, verbose=False)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        written = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert written >= _MIN_OPSET, f"the exporter wrote opset {written}"
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diffs = []
        for i, size in enumerate(check_sizes):
            _, inputs, _, _ = _graph_and_inputs(loaded, size, seed=1 + i)
            with torch.no_grad():
                want = graph(*inputs)
            want = want if isinstance(want, tuple) else (want,)
            got = session.run(None, {name: x.numpy() for name, x in zip(input_names, inputs)})
            diff = 0.0
            for g, t in zip(got, want):
                assert tuple(g.shape) == tuple(t.shape), f"onnxruntime gave {g.shape} at {size}, PyTorch {t.shape}"
                diff = max(diff, float((torch.from_numpy(g) - t).abs().max()))
            diffs.append(diff)
            assert diff <= tolerance, (f"{out}: onnxruntime differs from PyTorch by {diff:.3g} at LR {size} "
                                       f"(tolerance {tolerance:g})")
        del session
    check = OnnxCheck(out, written, input_names, output_names, list(check_sizes), diffs, tolerance)
    log.debug("%s", check.summary())
    return check

