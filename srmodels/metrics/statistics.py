"""Paired comparisons of two models on the same images: mean difference, bootstrap interval, wins and losses.

A difference of means between two SR models scored on a handful of images says little by itself: the images
differ far more from each other than the models do. Pairing by image removes that spread; the percentile
bootstrap over images then gives an interval for the mean per-image difference without assuming a
distribution. Seeded, so the interval is reproducible; with very few images it is wide, and its own coverage
is poor (three images give at most ten distinct resample means): the result says so instead of hiding it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

LEVEL = 0.95
FEW_IMAGES = 10  # below this, the interval is reported with a warning
FEW_SEEDS = 5    # likewise for the seeds of a sweep (crossed_bootstrap)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int, seed: int,
                     level: float = LEVEL) -> dict[str, Any]:
    """``a`` against ``b`` (per-image scores in the same image order; higher is better).

    Returns the mean of ``a - b``, its ``level`` percentile-bootstrap interval over images (``resamples``
    draws from ``numpy.random.default_rng(seed)``), per-image wins / losses / ties of ``a``, and a verdict:
    ``better`` or ``worse`` when the interval excludes 0, else ``no significant difference``.
    """
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = diffs.size
    if n == 0 or n != len(b):
        raise ValueError(f"paired scores needed, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    verdict = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
    out: dict[str, Any] = {
        "mean_diff": round(float(diffs.mean()), 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4),
        "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum()), "ties": int((diffs == 0).sum()),
        "num_images": n, "verdict": verdict}
    if n < FEW_IMAGES:
        out["warning"] = f"only {n} images: the interval is wide and its coverage poor"
    return out


def model_comparisons(psnr: dict[str, Sequence[float]], members: Sequence[str], *, self_ensemble: bool,
                      resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """The comparisons that judge a fusion: against each member (plain and x8), and what x8 gives each member.

    ``psnr[model]`` holds per-image PSNR-Y in one image order; keys read ``"<a> vs <b>"`` (differences a - b).
    """
    pairs: list[tuple[str, str]] = []
    for m in members:
        pairs.append(("fusion", m))
        if self_ensemble:
            pairs.append(("fusion", f"{m}+se"))
    if self_ensemble:
        pairs += [(f"{m}+se", m) for m in members]
    return {f"{a} vs {b}": paired_bootstrap(psnr[a], psnr[b], resamples=resamples, seed=seed) for a, b in pairs}


def crossed_bootstrap(diffs: np.ndarray, *, resamples: int, seed: int, level: float = LEVEL) -> dict[str, Any]:
    """A seeds x images table of paired differences (``diffs[s, i]`` = a - b for seed s on image i).

    Seeds and images are crossed, not nested: every seed is scored on the same images. Both are random draws
    (another sweep would train other seeds; another benchmark would hold other photographs), so each resample
    draws seeds and images with replacement, independently, and averages the resampled grid. The interval then
    covers what varies with the seed as well as what varies between images; resampling images only would
    pretend the seeds were the only ones there are.

    Returns the grand mean, its ``level`` percentile interval, per-seed wins / losses (the seed's mean
    difference above / below 0), the sizes and a verdict as :func:`paired_bootstrap`'s.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"a seeds x images table needed, got shape {d.shape}")
    n_seeds, n_images = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks bound the memory (resamples x seeds x images) for large benchmarks; the draws stay in one stream.
    chunk = max(1, 2_000_000 // (n_seeds * n_images))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        s = rng.integers(0, n_seeds, size=(k, n_seeds))
        i = rng.integers(0, n_images, size=(k, n_images))
        means[start:start + k] = d[s[:, :, None], i[:, None, :]].mean(axis=(1, 2))
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    per_seed = d.mean(axis=1)
    verdict = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
    out: dict[str, Any] = {
        "mean_diff": round(float(d.mean()), 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4),
        "seed_wins": int((per_seed > 0).sum()), "seed_losses": int((per_seed < 0).sum()),
        "num_seeds": n_seeds, "num_images": n_images, "verdict": verdict}
    few = [f"{n} {what}" for n, what, floor in ((n_seeds, "seeds", FEW_SEEDS), (n_images, "images", FEW_IMAGES))
           if n < floor]
    if few:
        out["warning"] = f"only {' and '.join(few)}: the interval is wide and its coverage poor"
    return out
