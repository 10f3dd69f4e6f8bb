"""Speed benchmarks: what `srmodels bench` prints.

Forward: median wall time per forward over ``runs`` after ``warmup`` calls, under ``torch.inference_mode``, of the
model as inference runs it (``srmodels.models.accelerate`` applied) and of the plain port on the same weights and input,
and their ratio (the accelerator's speed-up; about 1 where its kernels do not apply: CUDA, bf16); output megapixels
per second; peak memory (CUDA: allocator peak; CPU: the process's peak RSS so far, which only
grows). Fusion training: median time of one optimiser step of team 27's net on in-memory members, and the
projected time of the NTIRE recipe from it.
"""
from __future__ import annotations

import copy
import logging
import resource
import statistics
import time
from typing import Any, Callable

import torch

from srmodels.models.accelerate import accelerate
from srmodels.models.fusion import AttentionWeightNet, fuse, fusion_loss
from srmodels.models.inference import upscale
from srmodels.models.model import build_model

log = logging.getLogger(__name__)

# team 27's recipe: 150 epochs over the 800 DIV2K training images, one crop each per epoch
NTIRE_FUSION_SAMPLES = 150 * 800
DEFAULT_VARIANTS = ("dat_s", "swinir_m", "swinir_m_s48", "rfdn", "rrdbnet", "fusion")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> tuple[float, Any]:
    """Median wall time of ``step()`` over ``runs`` calls after ``warmup`` untimed ones, and its last result."""
    times, result = [], None
    for i in range(warmup + runs):
        _sync(device)
        t0 = time.perf_counter()
        result = step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bench_one(name: str, h: int, w: int, *, device: torch.device, dtype: torch.dtype, self_ensemble: bool,
              runs: int, warmup: int, plain: bool = False) -> dict[str, Any]:
    """Time one variant ('fusion' = team 27's net on three x4 members of an h x w LR image).

    ``ms`` is the accelerated model's median (``srmodels.models.accelerate``), ``plain_ms`` the plain port's on the same
    weights and input, ``speedup`` plain_ms / ms. With ``plain`` only the plain port is timed (``ms`` is its
    median, ``plain_ms`` and ``speedup`` are None).
    """
    torch.manual_seed(0)
    if name == "fusion":
        model = AttentionWeightNet(3)
        x = torch.rand(1, 9, h * 4, w * 4)
        scale = 1
    else:
        model = build_model(name)
        x = torch.rand(1, 3, h, w)
        scale = model.scale
    model = model.to(device).eval()
    x = x.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def time_forward(net: torch.nn.Module) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), autocast:
            return _median_seconds(
                lambda: upscale(net, x, scale, self_ensemble=self_ensemble) if scale > 1 else net(x),
                device, runs, warmup)

    plain_seconds, out = time_forward(model)
    seconds, plain_ms, speedup = plain_seconds, None, None
    if not plain:
        seconds, out = time_forward(accelerate(copy.deepcopy(model)))
        plain_ms, speedup = round(plain_seconds * 1000, 1), round(plain_seconds / seconds, 3)
    ms = seconds * 1000
    out_mp = out.shape[-2] * out.shape[-1] / 1e6
    return {"model": name, "input": f"{w}x{h}", "device": device.type, "dtype": _dtype_name(dtype),
            "self_ensemble": self_ensemble, "ms": round(ms, 1), "plain_ms": plain_ms, "speedup": speedup,
            "mp_per_s": round(out_mp / (ms / 1000), 3), "peak_mb": round(_peak_mb(device), 1)}


def bench_fusion_train(batch: int, lr_patch: int, *, device: torch.device, dtype: torch.dtype, runs: int,
                       warmup: int, scale: int = 4) -> dict[str, Any]:
    """Time optimiser steps of ``AttentionWeightNet(3)`` (forward, 0.8 L1 + 0.2 MSE, backward, Adam) on a batch
    of ``batch`` member triples of (lr_patch * scale)^2 pixels, as ``train_fusion`` runs them (bf16 autocast
    and channels_last on CUDA). Data loading is not included: the stage streams memory-mapped crops."""
    with torch.inference_mode(False), torch.enable_grad():  # callers (the CLI) may run under inference_mode
        return _fusion_train_steps(batch, lr_patch, device, dtype, runs, warmup, scale)


def _fusion_train_steps(batch: int, lr_patch: int, device: torch.device, dtype: torch.dtype, runs: int,
                        warmup: int, scale: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = AttentionWeightNet(3).to(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    size = lr_patch * scale
    cands = torch.rand(batch, 9, size, size, device=device).contiguous(memory_format=fmt)
    hr = torch.rand(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step() -> None:
        with autocast:
            weights = net(cands).float()
        loss = fusion_loss(fuse(cands, weights), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step, _ = _median_seconds(train_step, device, runs, warmup)
    samples = batch / step
    return {"batch": batch, "hr_patch": size, "device": device.type, "dtype": _dtype_name(dtype),
            "ms_per_step": round(step * 1000, 1), "samples_per_s": round(samples, 2),
            "hr_mp_per_s": round(samples * size * size / 1e6, 3),
            "ntire_recipe_minutes": round(NTIRE_FUSION_SAMPLES / samples / 60, 1), "peak_mb": round(_peak_mb(device), 1)}


def format_train_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'fusion train':<14}{'HR patch':>9}{'device':>8}{'dtype':>10}{'ms/step':>10}{'samples/s':>11}"
            f"{'HR MP/s':>9}{'NTIRE min':>11}{'peak MB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{'batch ' + str(r['batch']):<14}{r['hr_patch']:>9}{r['device']:>8}{r['dtype']:>10}"
                     f"{r['ms_per_step']:>10.1f}{r['samples_per_s']:>11.2f}{r['hr_mp_per_s']:>9.3f}"
                     f"{r['ntire_recipe_minutes']:>11.1f}{r['peak_mb']:>10.1f}")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """ms/forward is the accelerated model's (the plain port's under --plain); plain ms and speed-up compare."""
    head = (f"{'model':<14}{'input':>9}{'device':>8}{'dtype':>10}{'x8':>4}{'ms/forward':>12}{'plain ms':>10}"
            f"{'speed-up':>10}{'out MP/s':>10}{'peak MB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        plain = "-" if r.get("plain_ms") is None else f"{r['plain_ms']:.1f}"
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['model']:<14}{r['input']:>9}{r['device']:>8}{r['dtype']:>10}{'y' if r['self_ensemble'] else 'n':>4}"
                     f"{r['ms']:>12.1f}{plain:>10}{speedup:>10}{r['mp_per_s']:>10.3f}{r['peak_mb']:>10.1f}")
    return "\n".join(lines)
