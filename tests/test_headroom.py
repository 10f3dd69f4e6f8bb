"""The fusion's rivals as the score stage scores them (srmodels.evaluation.headroom): baselines, oracles, the paired
comparison with the best member, the share of the headroom, and costs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from srmodels.evaluation import headroom
from srmodels.evaluation.evaluation import image_scores
from srmodels.data.images import to_uint8


def _outputs_and_hr(seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(3, 24, 20, generator=g)
    cands = torch.stack([(hr + 0.05 * torch.randn(3, 24, 20, generator=g)).clamp(0, 1) for _ in range(3)])
    cands[1, :, :, :10] = (hr[:, :, :10] + 0.2).clamp(0, 1)  # member 1 is wrong on the left
    return cands, to_uint8(hr)


def test_rivals_are_the_members_combined_and_the_oracles_bound_them():
    cands, hr = _outputs_and_hr(0)
    psnr = [image_scores(to_uint8(c), hr, crop_border=2)["psnr_y"] for c in cands]
    outputs, seconds = headroom.rival_outputs(cands, hr, [0.0, 0.0, 1.0], psnr)
    assert set(outputs) == {*headroom.BASELINES, *headroom.ORACLES} and set(seconds) == set(outputs)
    assert np.array_equal(outputs["lsq"], to_uint8(cands[2]))  # weights (0, 0, 1): member 2 exactly
    assert np.array_equal(outputs["mean"], to_uint8(cands.double().mean(0)))
    assert np.array_equal(outputs["oracle:image"], to_uint8(cands[int(np.argmax(psnr))]))

    def mse(x: np.ndarray) -> float:
        return float(np.mean((x.astype(np.float64) - hr.astype(np.float64)) ** 2))
    members = [mse(to_uint8(c)) for c in cands]
    # Per pixel the oracles cannot be worse than any member (up to 8-bit rounding of a value at most 0.5 away).
    assert mse(outputs["oracle:pixel"]) <= min(members)
    assert mse(outputs["oracle:convex"]) <= mse(outputs["oracle:pixel"]) + 0.25
    y = {k: image_scores(v, hr, crop_border=2)["psnr_y"] for k, v in outputs.items()}
    assert y["oracle:convex-y"] >= y["oracle:convex"] - 0.01 and y["oracle:convex"] > max(psnr)


def test_comparison_with_the_best_member_and_the_share_of_headroom():
    ref = headroom.reference(["dat", "rfdn"], "dat", self_ensemble=True)
    assert ref == "dat+se" and headroom.reference(["dat", "rfdn"], "rfdn", self_ensemble=False) == "rfdn"
    with pytest.raises(ValueError, match="not one of"):
        headroom.reference(["dat"], "swinir", self_ensemble=True)
    base = [30.0, 31.0, 32.0, 33.0]
    psnr = {"dat+se": base, "fusion": [b + 0.1 for b in base], "mean": [b - 0.2 for b in base],
            "oracle:convex": [b + 0.4 for b in base]}
    out = headroom.compare_with_reference(psnr, "dat+se", ["fusion", "mean", "oracle:convex", "oracle:pixel"],
                                          resamples=200, seed=0)
    assert set(out) == {"fusion", "mean", "oracle:convex"}  # rows not scored are left out
    assert out["fusion"]["mean_diff"] == pytest.approx(0.1) and out["fusion"]["headroom_share"] == pytest.approx(0.25)
    assert "headroom_share" not in out["mean"] and "headroom_share" not in out["oracle:convex"]
    # No headroom (the oracle does not beat the member): no share, rather than a division by zero.
    psnr["oracle:convex"] = base
    out = headroom.compare_with_reference(psnr, "dat+se", ["fusion", "oracle:convex"], resamples=200, seed=0)
    assert out["fusion"]["headroom_share"] is None


def test_costs_count_the_members_in():
    baselines = {"costs": {"dat": {"params": 10, "macs_per_pixel": 100.0, "macs_per_pixel_se": 824.0},
                           "rfdn": {"params": 5, "macs_per_pixel": 50.0, "macs_per_pixel_se": 424.0}}}
    cost = headroom.costs(["dat", "rfdn"], baselines, {"params": 3, "macs_per_pixel": 7.0}, self_ensemble=True)
    assert cost["dat+se"] == {"params": 10, "macs_per_pixel": 824.0}
    assert cost["mean"] == {"params": 15, "macs_per_pixel": 824.0 + 424.0 + 6}
    assert cost["lsq"]["params"] == 17
    assert cost["fusion"] == {"params": 18, "macs_per_pixel": 824.0 + 424.0 + 7.0}
    assert cost["oracle:convex"] == {"params": None, "macs_per_pixel": None}
    plain = headroom.costs(["dat", "rfdn"], baselines, None, self_ensemble=False)
    assert plain["mean"]["macs_per_pixel"] == 156.0 and "fusion" not in plain
