"""Where and how a stage runs: device choice, CPU threads, seeds. Shared by the stages, training and the CLI."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error rather than a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Have glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    A DAT/SwinIR forward allocates and frees tens-of-MB activations in every block. By default glibc unmaps or
    trims most of them, so the next block's buffers are fresh pages that fault on first touch: about 210,000
    minor page faults per SwinIR-M forward at LR 120x84 (840 MB of pages), about 5% of its CPU time. Blocks up to
    32 MB now come from a heap that is never trimmed (10,500 faults left, all from the few larger maps). Larger
    blocks are still mapped and unmapped: keeping those too doubled the peak RSS of an untiled 510x339 SwinIR-M
    upscale through fragmentation. Returns False where malloc is not glibc's.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)))
    if not ok:
        log.warning("mallopt refused a setting; malloc keeps its defaults")
    return ok


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU intra-op threads: float reductions split differently with another count."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


def seed_everything(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed Python, NumPy and torch (all devices); on CPU also require deterministic kernels.

    ``warn_only``: an op without a deterministic implementation warns instead of failing the run. On CUDA the
    deterministic mode is left off: it needs a cuBLAS workspace setting and slows training, for bit-exactness
    that cross-GPU runs would not have anyway.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
