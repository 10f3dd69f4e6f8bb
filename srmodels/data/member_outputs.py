"""The cached member outputs: each member's SR output of every image later stages need, stored losslessly.

Layout under ``out_dir`` (one file per image, float16, (3, H, W), the [0, 1] scale, not clamped)::

    fusion_train/<stem>.npy            plain forward (what the fusion net learns from)
    val/<stem>.npy, val_se/<stem>.npy  plain and x8 self-ensemble
    eval/<set>/<stem>.npy, eval_se/<set>/<stem>.npy

float16 keeps ~3 decimal digits, far below one 8-bit level (1/255), and .npy files can be memory-mapped.
srmodels.models.caching writes them; every stage after the cache stage reads them here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from srmodels.core import layout
from srmodels.core.errors import DataError
from srmodels.core.files import atomic

log = logging.getLogger(__name__)


def save_output(path: Path, sr: torch.Tensor) -> None:
    # Atomic: a killed run leaves no cut .npy for the next stage to trip over.
    with atomic(path) as tmp:
        np.save(tmp, sr[0].float().cpu().numpy().astype(np.float16))


# Subfolders of one member's cache; <set> follows eval/ and eval_se/.
_FLAT, _PER_SET = (layout.FUSION_TRAIN, layout.VAL, layout.VAL_SE), (layout.EVAL, layout.EVAL_SE)


def rerun_hint(path: Path) -> str:
    """How to rebuild a cached file: the cache@<member> stage that wrote it (the member is read off the path)."""
    parts = path.parts
    member = None
    if len(parts) >= 3 and parts[-2] in _FLAT:
        member = parts[-3]
    elif len(parts) >= 4 and parts[-3] in _PER_SET:
        member = parts[-4]
    stage = f"cache@{member}" if member else "cache@<member>"
    return f"re-run the stage that wrote it: dvc repro -f {stage}"


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, without reading the data."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = readers[version](f)
        return tuple(shape), dtype, f.tell()


def check_output(path: Path) -> tuple[int, ...]:
    """Shape of a cached (3, H, W) output after checking that the file is whole; a ``DataError`` if not.

    Reads only the header and the file size, so it is cheap enough to run over every file before a stage
    starts. A memory-mapped read of a cut file would otherwise fail with numpy's 'mmap length is greater than
    file size', which names neither the file nor the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cached SR output missing; {rerun_hint(path)}")
    size = path.stat().st_size
    try:
        shape, dtype, offset = _header(path)
    except (ValueError, OSError, EOFError) as err:
        if "EOF" in str(err):
            raise DataError(f"{path}: truncated cached SR output ({size:,} bytes, cut inside the .npy header); "
                            f"{rerun_hint(path)}") from None
        raise DataError(f"{path}: not a readable .npy file ({' '.join(str(err).split()) or type(err).__name__}, "
                        f"{size:,} bytes); {rerun_hint(path)}") from None
    if dtype.hasobject or len(shape) != 3 or shape[0] != 3:
        raise DataError(f"{path}: holds a {dtype} array of shape {shape}, expected (3, H, W) float16; "
                        f"{rerun_hint(path)}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size < expected:
        raise DataError(f"{path}: truncated cached SR output ({size:,} bytes, expected {expected:,} for "
                        f"{dtype} {shape}); {rerun_hint(path)}")
    return shape


def load_output(path: Path, mmap: bool = False) -> np.ndarray:
    """(3, H, W) float16 as stored; ``mmap`` to read crops without loading the file.

    A missing, cut or otherwise unreadable file is a ``DataError`` naming it and the stage that rebuilds it.
    """
    check_output(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as err:  # the header was fine, so the data is damaged
        raise DataError(f"{path}: corrupt cached SR output ({' '.join(str(err).split())}); "
                        f"{rerun_hint(path)}") from None
