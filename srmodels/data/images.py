"""Image files in and out: 8-bit RGB arrays, folders of images, LR/HR pairing by stem.

Every problem with an input file is an ``ImageError`` whose message names the file, so command-line tools can
print one line instead of a traceback.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from pathlib import Path

import cv2
import numpy as np
import torch

from srmodels.core.errors import UserError
from srmodels.core.files import write_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_said: set[str] = set()


class ImageError(UserError):
    """A missing, unreadable or mismatched image; the message names the file."""


def _note_once(kind: str, message: str) -> None:
    if kind not in _said:
        _said.add(kind)
        log.warning(message)


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR header, or None for any other file (used only in messages)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def _size_limit_message(path: Path, limit_name: str) -> str:
    """OpenCV refuses headers above CV_IO_MAX_IMAGE_PIXELS (default 2^30), WIDTH or HEIGHT (2^20); say how to lift it.

    OpenCV reads each limit from the environment variable of the same name with an OPENCV_ prefix
    (CV_IO_MAX_IMAGE_PIXELS <- OPENCV_IO_MAX_IMAGE_PIXELS), once, when it starts.
    """
    what = limit_name.rsplit("_", 1)[-1].lower()
    env = f"OPEN{limit_name}"
    default = 2**30 if what == "pixels" else 2**20
    limit = os.environ.get(env, f"{default:,}")
    size = _png_size(path)
    declared, needed = "", ""
    if size is not None:
        declared = f"; its header declares {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
        value = size[0] * size[1] if what == "pixels" else size[0] if what == "width" else size[1]
        needed = f", e.g. {env}={value}"
    return (f"{path}: image is larger than OpenCV's {what.rstrip('s')} limit {limit_name} ({limit}){declared}; "
            f"raise it with the environment variable {env}{needed}")


def _cv_reason(err: Exception) -> str:
    """The human part of an OpenCV exception ('could not find a writer ...'), without file and function."""
    text = " ".join(str(err).split())
    m = re.search(r"error: \([^)]*\) (.*?)(?: in function .*)?$", text)
    return (m.group(1) if m else text) or type(err).__name__


def read_image(path: str | Path) -> np.ndarray:
    """An HxWx3 uint8 RGB array. Grayscale, alpha and 16-bit files are converted (said once per kind)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image")
    try:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # OpenCV raises (rather than returning None) for a few header problems
        m = re.search(r"CV_IO_MAX_IMAGE_(?:PIXELS|WIDTH|HEIGHT)", str(err))
        if m:
            raise ImageError(_size_limit_message(path, m.group(0))) from err
        raise ImageError(f"{path}: not a readable image ({_cv_reason(err)})") from err
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
    """Write an HxWx3 uint8 RGB array losslessly (PNG unless the suffix says otherwise).

    Atomic: the encoded bytes go to a temporary file beside ``path``, renamed into place, so a failure (a full
    disk, Ctrl-C) never leaves a partial image, nor replaces an existing one with one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # here, for the messages; atomic() finds it made
    except OSError as err:
        blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # the usual cause: a file where the output folder should be
            raise ImageError(f"{blocker}: is a file, not a folder; cannot write {path.name} under it") from None
        raise ImageError(f"{path.parent}: cannot create the output folder ({err.strerror or err})") from None
    try:
        # imencode gives the bytes imwrite would write (same encoder, same defaults)
        ok, data = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(img[:, :, ::-1]))
    except cv2.error as err:  # an unknown suffix raises instead of returning False
        raise ImageError(f"{path}: could not write image ({_cv_reason(err)})") from err
    if not ok:
        raise ImageError(f"{path}: could not write image")
    try:
        write_bytes(path, data.tobytes())
    except OSError as err:
        raise ImageError(f"{path}: could not write image ({err.strerror or err})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, decoded in full so that a corrupt file is caught; nothing is kept."""
    img = read_image(path)
    return img.shape[0], img.shape[1]


def list_images(folder: str | Path) -> list[Path]:
    """Image files in a folder, sorted by name; other files are skipped with a note, hidden ones (a write's
    temporary file left by a killed run among them) silently."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: no such folder")
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
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


def check_pair_sizes(hr_size: tuple[int, ...], lr_size: tuple[int, ...], scale: int, hr_path: Path,
                     lr_path: Path) -> None:
    """An LR (height, width) that is not the HR's // scale is an error naming the LR file."""
    (H, W), (h, w) = hr_size[:2], lr_size[:2]
    if not (H // scale == h and W // scale == w):
        raise ImageError(f"{lr_path}: LR size {w}x{h} does not match HR {hr_path.name} ({W}x{H}) at scale x{scale}")


def check_pair(hr: np.ndarray, lr: np.ndarray, scale: int, hr_path: Path, lr_path: Path) -> np.ndarray:
    """HR cropped to scale x LR; an LR that does not fit the HR at this scale is an error."""
    check_pair_sizes(hr.shape, lr.shape, scale, hr_path, lr_path)
    h, w = lr.shape[:2]
    return hr[: h * scale, : w * scale]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0).unsqueeze(0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0, 1] -> HxWx3 uint8, clamped and rounded as when saved."""
    if t.ndim == 4:
        t = t[0]
    return t.detach().float().clamp(0, 1).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()
