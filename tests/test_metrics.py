"""PSNR / SSIM / Y conversion: hand-computed cases, skimage agreement, cropping and input conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from srmodels.metrics.psnr_ssim import calculate_psnr, calculate_ssim, gaussian_window, rgb_to_y


def _rand_rgb(seed: int, shape=(40, 36, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _skimage_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None) -> float:
    return float(
        structural_similarity(
            a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255, channel_axis=channel_axis,
        )
    )


def test_rgb_to_y_values():
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]], [[0, 255, 0], [0, 0, 255], [128, 64, 32]]], np.uint8)
    y = rgb_to_y(img, data_range=255)
    assert y.dtype == np.float64 and y.shape == (2, 3)
    expected = [
        [16.0, 235.0, 16.0 + 65.481],
        [16.0 + 128.553, 16.0 + 24.966, 16.0 + (65.481 * 128 + 128.553 * 64 + 24.966 * 32) / 255.0],
    ]
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-9)
    # Not rounded: the last pixel is fractional.
    assert y[1, 2] != round(y[1, 2])
    # The [0, 1] convention gives the same Y (on 0-255).
    np.testing.assert_allclose(rgb_to_y(img.astype(np.float32) / 255.0, data_range=1.0), y, atol=1e-4)
    with pytest.raises(ValueError, match=r"expects an HxWx3 RGB image, got shape \(2, 3, 2\)"):
        rgb_to_y(img[..., :2], data_range=255)


def test_psnr_hand_computed():
    ref = np.full((8, 8, 3), 100, np.uint8)
    img = ref.copy()
    img[..., 0] += 3  # one channel off by 3: MSE = 9 / 3 = 3 over RGB
    assert calculate_psnr(img, ref, 0, False, data_range=255) == pytest.approx(10 * math.log10(255**2 / 3), abs=1e-12)
    # On Y the error is 3 * 65.481 / 255 everywhere.
    dy = 3 * 65.481 / 255
    assert calculate_psnr(img, ref, 0, True, data_range=255) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-9)
    # Peak is 255 regardless of convention: [0, 1] floats give the same number.
    assert calculate_psnr(img / 255.0, ref / 255.0, 0, False, data_range=1.0) == pytest.approx(
        10 * math.log10(255**2 / 3), abs=1e-9
    )
    assert calculate_psnr(ref, ref, 0, False, data_range=255) == math.inf
    assert calculate_psnr(ref, ref, 2, True, data_range=255) == math.inf


def test_crop_border():
    ref = _rand_rgb(0)
    img = ref.copy()
    img[:4] = 0
    img[:, -4:] = 255
    assert calculate_psnr(img, ref, 0, True, data_range=255) < 40
    assert calculate_psnr(img, ref, 4, True, data_range=255) == math.inf
    assert calculate_psnr(img, ref, 3, False, data_range=255) < 40
    assert calculate_ssim(img, ref, 4, False, data_range=255) == pytest.approx(1.0, abs=1e-12)
    assert calculate_ssim(img, ref, 0, False, data_range=255) < 0.99
    # Crop equals slicing by hand.
    a, b = _rand_rgb(1), _rand_rgb(2)
    assert calculate_psnr(a, b, 5, False, data_range=255) == calculate_psnr(a[5:-5, 5:-5], b[5:-5, 5:-5], 0, False, data_range=255)
    assert calculate_ssim(a, b, 5, True, data_range=255) == calculate_ssim(a[5:-5, 5:-5], b[5:-5, 5:-5], 0, True, data_range=255)


def test_ssim_matches_skimage():
    ref = _rand_rgb(3, (48, 41, 3))
    noise = np.random.default_rng(4).normal(0, 12, ref.shape)
    img = np.clip(ref + noise, 0, 255).astype(np.uint8)
    ours_rgb = calculate_ssim(img, ref, 0, False, data_range=255)
    assert ours_rgb == pytest.approx(_skimage_ssim(img, ref, channel_axis=2), abs=1e-4)
    # Y: compare against skimage on our (unrounded) Y planes.
    ours_y = calculate_ssim(img, ref, 0, True, data_range=255)
    y_img, y_ref = rgb_to_y(img, data_range=255), rgb_to_y(ref, data_range=255)
    assert ours_y == pytest.approx(_skimage_ssim(y_img, y_ref, channel_axis=None), abs=1e-4)
    # With a crop.
    ours_c = calculate_ssim(img, ref, 4, True, data_range=255)
    assert ours_c == pytest.approx(_skimage_ssim(y_img[4:-4, 4:-4], y_ref[4:-4, 4:-4], channel_axis=None), abs=1e-4)
    # RGB SSIM is the mean of per-channel SSIMs.
    per_channel = [calculate_ssim(img[..., c], ref[..., c], 0, False, data_range=255) for c in range(3)]
    assert ours_rgb == pytest.approx(float(np.mean(per_channel)), abs=1e-12)


def test_ssim_hand_cases():
    ref = _rand_rgb(5, (20, 20, 3))
    assert calculate_ssim(ref, ref, 0, False, data_range=255) == pytest.approx(1.0, abs=1e-12)
    # Constant images differing in level: only the luminance term, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a = np.full((16, 16), 100.0)
    b = np.full((16, 16), 120.0)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)
    assert calculate_ssim(a, b, 0, False, data_range=255) == pytest.approx(expected, abs=1e-12)
    # Gaussian window: 11 normalised, symmetric taps with sigma 1.5.
    g = gaussian_window()
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0) and np.allclose(g, g[::-1])
    assert g[6] / g[5] == pytest.approx(math.exp(-1 / (2 * 1.5**2)))


def test_input_conventions_and_errors():
    a, b = _rand_rgb(6), _rand_rgb(7)
    p255 = calculate_psnr(a, b, 4, True, data_range=255)
    p1 = calculate_psnr(a.astype(np.float64) / 255, b.astype(np.float64) / 255, 4, True, data_range=1.0)
    assert p1 == pytest.approx(p255, abs=1e-9)
    s255 = calculate_ssim(a, b, 4, True, data_range=255)
    s1 = calculate_ssim(a / 255.0, b / 255.0, 4, True, data_range=1.0)
    assert s1 == pytest.approx(s255, abs=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        calculate_psnr(a, b[:-1], 0, False, data_range=255)
    with pytest.raises(ValueError, match="shapes differ"):
        calculate_ssim(a, b[..., :1], 0, False, data_range=255)
    with pytest.raises(ValueError, match="uint8 images are on the 0-255 scale; got data_range=1.0"):
        calculate_psnr(a, b, 0, False, data_range=1.0)  # uint8 is never on a 0-1 scale
    with pytest.raises(ValueError, match="crop_border 20 leaves nothing"):
        calculate_psnr(a, b, 20, False, data_range=255)  # crop leaves nothing
    with pytest.raises(ValueError, match="SSIM needs at least 11x11 pixels after cropping"):
        calculate_ssim(a[:14], b[:14], 2, False, data_range=255)  # smaller than the 11x11 window
    # The default convention is 0-255; data_range is keyword-only so a positional slip cannot set it.
    assert calculate_psnr(a, b, 4, True) == p255
    with pytest.raises(TypeError, match="takes 4 positional arguments but 5 were given"):
        calculate_psnr(a, b, 0, False, 255)  # type: ignore[misc]
