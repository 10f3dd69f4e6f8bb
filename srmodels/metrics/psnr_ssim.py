"""PSNR and SSIM for super-resolution, exactly the protocol of the reference numbers.

Protocol (reference README, 'Reference numbers'; NTIRE ``utils_image.cal_psnr_ssim``; BasicSR):

* Images are HxWxC RGB (or HxW single-channel) arrays. Every computation runs in float64 on the 0-255 scale.
* The input convention is explicit: the keyword ``data_range`` is the value of white in the arrays passed
  in. Its default, 255, is the uint8 / 0-255 convention of saved images; pass ``data_range=1.0`` for float
  arrays in [0, 1]. Arrays are multiplied by ``255 / data_range``; nothing is inferred from the dtype or the
  values (a [0, 1] float image passed with the default is NOT detected -- it scores as a nearly black
  image), except that uint8 with a data_range other than 255 is rejected. Nothing is clipped or rounded
  here: clamp and round SR outputs to uint8 first for the "as saved" numbers of the reference protocol.
* ``y_channel=True``: BT.601 luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with RGB in [0, 1], giving Y
  in [16, 235] on the 0-255 scale, not rounded.
* ``crop_border`` pixels are removed on every side (after the Y conversion, which is per pixel anyway).
* PSNR: ``10 log10(255^2 / MSE)`` over all remaining values (all channels for RGB); ``inf`` when identical.
* SSIM: 11x11 Gaussian window (sigma 1.5), C1 = (0.01*255)^2, C2 = (0.03*255)^2, population (not sample)
  statistics, mean of the SSIM map over the valid region (the 5-pixel rim that the window cannot fully cover
  is dropped); for RGB the mean of the per-channel SSIMs.

Cropping the HR image to the SR size (4x the LR size) is the caller's job; mismatched shapes are an error.
"""
from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

_PEAK = 255.0
# BT.601 luma coefficients for RGB in [0, 1] and output on the 0-255 (16-235) scale.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
_Y_OFFSET = 16.0

_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * _PEAK) ** 2
_SSIM_C2 = (0.03 * _PEAK) ** 2


def to_float255(img: np.ndarray, data_range: float) -> np.ndarray:
    """``img`` as float64 on the 0-255 scale, given the value of white (``data_range``) in ``img``."""
    if not data_range > 0:
        raise ValueError(f"data_range must be positive (255 for uint8, 1.0 for [0,1] floats), got {data_range}")
    arr = np.asarray(img)
    if arr.dtype == np.uint8 and data_range != 255:
        # A uint8 image on a 0-1 scale would be all black or white: almost surely a wrong argument.
        raise ValueError(f"uint8 images are on the 0-255 scale; got data_range={data_range}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"expected an integer or float image, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if data_range != _PEAK:
        out *= _PEAK / data_range
    return out


def rgb_to_y(img: np.ndarray, *, data_range: float = 255.0) -> np.ndarray:
    """BT.601 luma of an HxWx3 RGB image, float64 on the 0-255 scale (16 for black, 235 for white).

    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1]; not rounded. ``data_range`` is the
    value of white in ``img`` (255 for uint8, 1.0 for [0, 1] floats).
    """
    rgb = to_float255(img, data_range)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects an HxWx3 RGB image, got shape {rgb.shape}")
    # An explicit weighted sum, not a matmul: BLAS rounds differently with the array's memory layout, and a
    # transposed view of identical pixels must still score inf.
    w = _Y_WEIGHTS / _PEAK
    return rgb[..., 0] * w[0] + rgb[..., 1] * w[1] + rgb[..., 2] * w[2] + _Y_OFFSET


def _prepare(
    img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool, data_range: float
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 HxWxC on 0-255, Y-converted if asked, border-cropped."""
    a, b = np.asarray(img), np.asarray(ref)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs reference {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC images, got shape {a.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if y_channel:
        a = rgb_to_y(a, data_range=data_range)[..., None]
        b = rgb_to_y(b, data_range=data_range)[..., None]
    else:
        a, b = to_float255(a, data_range), to_float255(b, data_range)
        if a.ndim == 2:
            a, b = a[..., None], b[..., None]
    if crop_border:
        if a.shape[0] <= 2 * crop_border or a.shape[1] <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def calculate_psnr(
    img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool, *, data_range: float = 255.0
) -> float:
    """PSNR in dB of ``img`` against ``ref`` (peak 255 on the 0-255 scale, also on Y); ``inf`` if identical.

    Args:
        img, ref: HxWx3 RGB (or HxW) arrays of identical shape.
        crop_border: pixels removed on each side before comparing.
        y_channel: compare BT.601 Y instead of all RGB values.
        data_range: value of white in the inputs: 255 (default) for uint8 / 0-255 floats, 1.0 for [0, 1] floats.
    """
    a, b = _prepare(img, ref, crop_border, y_channel, data_range)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(_PEAK * _PEAK / mse)


def gaussian_window(size: int = _SSIM_WIN, sigma: float = _SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps (what ``cv2.getGaussianKernel(size, sigma)`` gives for sigma > 0)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``taps`` on both axes, 'valid' region only (HxW -> H-k+1 x W-k+1)."""
    k = taps.size
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i, t in enumerate(taps):
        rows += t * img[i : i + h - k + 1]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for i, t in enumerate(taps):
        out += t * rows[:, i : i + w - k + 1]
    return out


def _ssim_channel(a: np.ndarray, b: np.ndarray, taps: np.ndarray) -> float:
    mu_a = _filter_valid(a, taps)
    mu_b = _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a * mu_a
    var_b = _filter_valid(b * b, taps) - mu_b * mu_b
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + _SSIM_C1) * (2.0 * cov + _SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    return float(np.mean(num / den))


def calculate_ssim(
    img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool, *, data_range: float = 255.0
) -> float:
    """SSIM of ``img`` against ``ref`` (11x11 Gaussian, sigma 1.5, 0-255 constants, valid-region mean).

    Arguments as :func:`calculate_psnr`. On RGB the result is the mean of the three per-channel SSIMs. The
    cropped image must be at least 11x11.
    """
    a, b = _prepare(img, ref, crop_border, y_channel, data_range)
    if a.shape[0] < _SSIM_WIN or a.shape[1] < _SSIM_WIN:
        raise ValueError(f"SSIM needs at least {_SSIM_WIN}x{_SSIM_WIN} pixels after cropping, got {a.shape[:2]}")
    taps = gaussian_window()
    return float(np.mean([_ssim_channel(a[..., c], b[..., c], taps) for c in range(a.shape[2])]))
