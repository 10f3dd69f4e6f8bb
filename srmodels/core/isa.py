"""Pin the CPU kernels' instruction set, so that float results do not depend on which x86-64 CPU runs them.

oneDNN, MKL and ATen each pick their kernels per CPU at run time. An AVX-512 machine and an AVX2 machine then
round differently: a 60-epoch training run ends 0.3 dB apart. All three libraries take an upper bound on the
instruction set from the environment, read once when torch loads:

    ATEN_CPU_CAPABILITY   ATen's vectorised kernels (default | avx2 | avx512)
    ONEDNN_MAX_CPU_ISA    oneDNN's convolutions, matmuls and packed linears (SSE41 | AVX2 | AVX512_CORE | ...)
    MKL_CBWR              MKL's BLAS (torch's sgemm on x86): a code branch and STRICT, which also removes MKL's
                          dependence on data alignment

so ``pin(level)`` must run before ``import torch``. Stages call it from ``params.yaml`` (``cpu_isa``), the CLI
from ``--cpu-isa``. ``native`` leaves the environment alone (fastest, results tied to the CPU kind). Pinning to
a level the CPU lacks is an error, not a silent fallback. NumPy (float64 metrics, explicit element-wise sums)
and OpenCV (8-bit image decoding) compute the same on every CPU, so they need no pin.

This module must not import torch: its whole point is to run first.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any

from srmodels.core.errors import UserError

NATIVE = "native"
# level -> (environment, /proc/cpuinfo flags the CPU must have for it)
LEVELS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "sse41": ({"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "SSE4_2,STRICT"},
              ("sse4_1", "sse4_2")),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
             ("avx2", "fma")),
    "avx512": ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "AVX512,STRICT"},
               ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
}
CHOICES = (*LEVELS, NATIVE)
# What torch.backends.cpu.get_cpu_capability() reports once a level is in force.
_ATEN_NAME = {"sse41": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
ENV_VAR = "SRMODELS_CPU_ISA"  # records the level this process pinned (children inherit it)


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); an empty set where /proc/cpuinfo is absent."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``); '' where /proc/cpuinfo is absent."""
    return _cpuinfo("vendor_id") or ""


def native_level(flags: set[str] | None = None) -> str:
    """The highest pinnable level this CPU has (what its kernels would pick, roughly)."""
    flags = cpu_flags() if flags is None else flags
    for level in ("avx512", "avx2", "sse41"):
        if set(LEVELS[level][1]) <= flags:
            return level
    return NATIVE


def level_below(level: str) -> str:
    """The next lower level (for emulating an older CPU in tests)."""
    order = list(LEVELS)
    i = order.index(level) if level in order else len(order)
    return order[max(i - 1, 0)]


def environment(level: str) -> dict[str, str]:
    """The environment variables that pin ``level`` (empty for native)."""
    if level == NATIVE:
        return {}
    if level not in LEVELS:
        raise UserError(f"cpu_isa: {level!r} is not one of {', '.join(CHOICES)}")
    return dict(LEVELS[level][0])


def pin(level: str, *, source: str = "cpu_isa") -> dict[str, str]:
    """Set the environment that pins ``level``, before torch loads; returns what was set.

    ``source`` names the setting in error messages (a params key or a CLI option). If torch is already loaded,
    the environment can no longer take effect: that is an error unless it already holds these values.
    """
    env = environment(level)
    flags = cpu_flags()
    if env and flags:  # without /proc/cpuinfo there is nothing to check against
        missing = [f for f in LEVELS[level][1] if f not in flags]
        if missing:
            raise UserError(f"{source}: {level!r} needs CPU features this CPU lacks ({', '.join(missing)}); "
                            f"use {native_level()!r} or {NATIVE!r}")
    if "torch" in sys.modules:
        stale = {k: v for k, v in env.items() if os.environ.get(k) != v}
        if stale:
            raise UserError(f"{source}: {level!r} must be pinned before torch is imported "
                            f"(set {', '.join(f'{k}={v}' for k, v in stale.items())} in the environment)")
    os.environ.update(env)
    os.environ[ENV_VAR] = level
    return env


def pin_from_params(path: str | Path) -> str:
    """Pin the level named by ``cpu_isa`` in a params file (read without validating the rest: that needs torch).

    A missing file or key pins nothing here; full validation reports it later with the key's name.
    """
    from srmodels.core.params import ParamsError, read_yaml

    try:
        raw = read_yaml(path)
    except ParamsError:
        return NATIVE
    level = raw.get("cpu_isa", NATIVE) if isinstance(raw, dict) else NATIVE
    if not isinstance(level, str):
        raise UserError(f"cpu_isa: expected one of {', '.join(CHOICES)}, got {level!r}")
    pin(level)
    return level


@functools.lru_cache(maxsize=None)  # fixed once torch has loaded; stages ask for it several times
def provenance() -> dict[str, Any]:
    """Where the numbers came from: the pin, the kernels actually in force, the CPU and library versions.

    Imports torch; call after :func:`pin`. Raises when a pin did not take effect (torch was loaded first by
    something else), since results would then silently depend on the CPU again.
    """
    import re

    import torch

    level = os.environ.get(ENV_VAR, NATIVE)
    aten = torch.backends.cpu.get_cpu_capability()
    if level in _ATEN_NAME and aten != _ATEN_NAME[level]:
        raise UserError(f"cpu_isa: {level!r} requested but ATen runs {aten} kernels "
                        "(torch was imported before the pin)")
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    onednn = re.search(r"MKL-DNN (v[\w.]+)", config)
    return {"cpu_isa": level, "aten_capability": aten, "cpu_vendor": cpu_vendor(), "cpu_model": cpu_model(),
            "cpu_native_level": native_level(), "torch": torch.__version__,
            "onednn": onednn.group(1) if onednn else "none", "mkl": mkl.group(1) if mkl else "none",
            **{k: os.environ.get(k, "") for k in LEVELS["avx2"][0]}}
