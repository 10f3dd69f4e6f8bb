"""Forward-speed benchmark of the backbones and the fusion net: what `srmodels bench` prints.

Median wall time per forward over ``runs`` after ``warmup`` calls, under ``torch.inference_mode``; output
megapixels per second; peak memory (CUDA: allocator peak; CPU: the process's peak RSS so far, which only grows).
"""
from __future__ import annotations

import logging
import resource
import statistics
import time
from typing import Any

import torch

from .fusion import AttentionWeightNet
from .inference import upscale
from .model import build_model

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("dat_s", "swinir_m", "swinir_m_s48", "rfdn", "rrdbnet", "fusion")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, h: int, w: int, *, device: torch.device, dtype: torch.dtype, self_ensemble: bool,
              runs: int, warmup: int) -> dict[str, Any]:
    """Time one variant ('fusion' = team 27's net on three x4 candidates of an h x w LR image)."""
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
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + runs):
            _sync(device)
            t0 = time.perf_counter()
            out = upscale(model, x, scale, self_ensemble=self_ensemble) if scale > 1 else model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    out_mp = out.shape[-2] * out.shape[-1] / 1e6
    return {"model": name, "input": f"{w}x{h}", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "self_ensemble": self_ensemble, "ms": round(ms, 1), "mp_per_s": round(out_mp / (ms / 1000), 3),
            "peak_mb": round(_peak_mb(device), 1)}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<14}{'input':>9}{'device':>8}{'dtype':>10}{'x8':>4}{'ms/forward':>12}{'out MP/s':>10}{'peak MB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<14}{r['input']:>9}{r['device']:>8}{r['dtype']:>10}{'y' if r['self_ensemble'] else 'n':>4}"
                     f"{r['ms']:>12.1f}{r['mp_per_s']:>10.3f}{r['peak_mb']:>10.1f}")
    return "\n".join(lines)
