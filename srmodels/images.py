"""Image files in and out: 8-bit RGB arrays, folders of images, LR/HR pairing by stem.

Every problem with an input file is an ``ImageError`` whose message names the file, so command-line tools can
print one line instead of a traceback.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_said: set[str] = set()


class ImageError(UserError):
    """A missing, unreadable or mismatched image; the message names the file."""


def _note_once(kind: str, message: str) -> None:
    if kind not in _said:
        _said.add(kind)
        log.warning(message)


def read_image(path: str | Path) -> np.ndarray:
    """An HxWx3 uint8 RGB array. Grayscale, alpha and 16-bit files are converted (said once per kind)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    if img.dtype == np.uint16:
        _note_once("16bit", f"{path}: 16-bit image converted to 8 bit (and likewise for any others)")
        img = np.round(img.astype(np.float64) / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"{path}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        _note_once("gray", f"{path}: grayscale image converted to RGB (and likewise for any others)")
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.shape[2] == 4:
        _note_once("alpha", f"{path}: alpha channel dropped (and likewise for any others)")
        img = img[:, :, :3]
    elif img.shape[2] != 3:
        raise ImageError(f"{path}: {img.shape[2]} channels, expected 1, 3 or 4")
    return np.ascontiguousarray(img[:, :, ::-1])


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB array losslessly (PNG unless the suffix says otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(img[:, :, ::-1])):
        raise ImageError(f"{path}: could not write image")


def list_images(folder: str | Path) -> list[Path]:
    """Image files in a folder, sorted by name; other files are skipped with a note."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: no such folder")
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        elif p.is_file() and not p.name.startswith("."):
            skipped.append(p.name)
    if skipped:
        log.warning("%s: ignored %d non-image file(s): %s", folder, len(skipped), ", ".join(skipped[:5]))
    return files


def lr_stem(stem: str, scale: int) -> str:
    """HR stem of an LR file name: 'birdx4' -> 'bird', '0001x4' -> '0001'; other names unchanged."""
    return re.sub(rf"[xX]{scale}$", "", stem)


def pair_by_stem(hr_files: list[Path], lr_files: list[Path], scale: int) -> list[tuple[Path, Path]]:
    """(hr, lr) pairs matched by stem (``bird`` <-> ``birdx4``); an HR without LR is an error naming it."""
    lr_by_stem = {lr_stem(p.stem, scale): p for p in lr_files}
    pairs = []
    for hr in hr_files:
        lr = lr_by_stem.get(hr.stem)
        if lr is None:
            raise ImageError(f"{hr}: no LR image named {hr.stem}x{scale}.* or {hr.stem}.* in {lr_files[0].parent if lr_files else 'the LR folder'}")
        pairs.append((hr, lr))
    return pairs


def check_pair(hr: np.ndarray, lr: np.ndarray, scale: int, hr_path: Path, lr_path: Path) -> np.ndarray:
    """HR cropped to scale x LR; an LR that does not fit the HR at this scale is an error."""
    h, w = lr.shape[:2]
    H, W = hr.shape[:2]
    if not (H // scale == h and W // scale == w):
        raise ImageError(f"{lr_path}: LR size {w}x{h} does not match HR {hr_path.name} ({W}x{H}) at scale x{scale}")
    return hr[: h * scale, : w * scale]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0).unsqueeze(0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0, 1] -> HxWx3 uint8, clamped and rounded as when saved."""
    if t.ndim == 4:
        t = t[0]
    return t.detach().float().clamp(0, 1).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()
