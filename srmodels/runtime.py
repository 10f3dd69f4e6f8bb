"""Where and how a stage runs: device choice, CPU threads, seeds. Shared by the stages, training and the CLI."""
from __future__ import annotations

import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error rather than a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


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
