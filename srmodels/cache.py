"""Run a backbone once over every image later stages need, and store its outputs losslessly.

Layout under ``out_dir`` (one file per image, float16, (3, H, W), the [0, 1] scale, not clamped)::

    fusion_train/<stem>.npy            plain forward (what the fusion net learns from)
    val/<stem>.npy, val_se/<stem>.npy  plain and x8 self-ensemble
    eval/<set>/<stem>.npy, eval_se/<set>/<stem>.npy

float16 keeps ~3 decimal digits, far below one 8-bit level (1/255), and .npy files can be memory-mapped.
No stage after this one runs a backbone.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .images import list_images, read_image, to_tensor
from .inference import upscale

log = logging.getLogger(__name__)


def save_output(path: Path, sr: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, sr[0].float().cpu().numpy().astype(np.float16))


def load_output(path: Path, mmap: bool = False) -> np.ndarray:
    """(3, H, W) float16 as stored; ``mmap`` to read crops without loading the file."""
    return np.load(path, mmap_mode="r" if mmap else None)


def cache_outputs(model: torch.nn.Module, prepared: Path, out_dir: Path, *, scale: int, self_ensemble: bool,
                  tile: int | None, tile_overlap: int, device: torch.device) -> dict[str, int]:
    """Upscale fusion_train, val and every eval set; returns how many images each output folder got."""
    if out_dir.exists():
        shutil.rmtree(out_dir)  # stale outputs of removed images must not survive
    jobs: list[tuple[Path, Path, bool]] = [(prepared / "fusion_train" / "lr", out_dir / "fusion_train", False),
                                           (prepared / "val" / "lr", out_dir / "val", False)]
    if self_ensemble:
        jobs.append((prepared / "val" / "lr", out_dir / "val_se", True))
    for set_dir in sorted(p for p in (prepared / "eval").iterdir() if p.is_dir()):
        jobs.append((set_dir / "lr", out_dir / "eval" / set_dir.name, False))
        if self_ensemble:
            jobs.append((set_dir / "lr", out_dir / "eval_se" / set_dir.name, True))
    counts: dict[str, int] = {}
    model = model.to(device).eval()
    with torch.inference_mode():
        for lr_dir, dst, ensemble in jobs:
            files = list_images(lr_dir)
            for path in tqdm(files, desc=str(dst.relative_to(out_dir)), leave=False):
                x = to_tensor(read_image(path)).to(device)
                sr = upscale(model, x, scale, self_ensemble=ensemble, tile=tile, tile_overlap=tile_overlap)
                save_output(dst / f"{path.stem}.npy", sr)
            counts[str(dst.relative_to(out_dir))] = len(files)
            log.info("%s: %d images", dst, len(files))
    return counts
