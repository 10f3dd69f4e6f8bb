"""Paired comparisons: the bootstrap interval behaves as statistics says, deterministically, and is reported."""
import numpy as np
import pytest

from srmodels.evaluation.evaluation import flat_scores
from srmodels.evaluation.report import comparison_table
from srmodels.metrics.statistics import model_comparisons, paired_bootstrap


def test_a_constant_gain_is_better_with_a_zero_width_interval():
    b = [30.0, 25.5, 33.25, 28.0, 31.0, 29.5, 27.0, 26.0, 35.0, 32.0, 30.5]
    c = paired_bootstrap([x + 0.25 for x in b], b, resamples=1000, seed=0)
    assert c["mean_diff"] == c["ci_low"] == c["ci_high"] == 0.25
    assert (c["wins"], c["losses"], c["ties"], c["num_images"]) == (11, 0, 0, 11)
    assert c["verdict"] == "better" and "warning" not in c
    assert paired_bootstrap(b, [x + 0.25 for x in b], resamples=1000, seed=0)["verdict"] == "worse"


def test_interval_width_matches_the_normal_theory_and_covers_the_mean():
    # 40 images, per-image differences N(0.3, 1): the 95% interval is about 0.3 +- 1.96 / sqrt(40) = +-0.31.
    rng = np.random.default_rng(7)
    b = rng.normal(30, 3, 40)
    d = rng.normal(0.3, 1.0, 40)
    c = paired_bootstrap(b + d, b, resamples=10000, seed=0)
    half = (c["ci_high"] - c["ci_low"]) / 2
    assert 0.8 * 1.96 * d.std() / np.sqrt(40) < half < 1.2 * 1.96 * d.std() / np.sqrt(40)
    assert c["ci_low"] < c["mean_diff"] < c["ci_high"] and c["mean_diff"] == round(d.mean(), 4)


def test_no_difference_when_the_interval_holds_zero():
    rng = np.random.default_rng(3)
    b = rng.normal(30, 3, 30)
    noise = rng.normal(0, 1, 30)
    c = paired_bootstrap(b + noise - noise.mean(), b, resamples=2000, seed=1)
    assert c["ci_low"] < 0 < c["ci_high"] and c["verdict"] == "no significant difference"


def test_seeded_and_deterministic():
    a, b = [30.1, 29.0, 31.5, 28.2], [30.0, 29.2, 31.0, 28.0]
    first = paired_bootstrap(a, b, resamples=5000, seed=0)
    assert first == paired_bootstrap(a, b, resamples=5000, seed=0)
    assert first["warning"] == "only 4 images: the interval is wide and its coverage poor"
    assert (first["wins"], first["losses"]) == (3, 1)


def test_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([1.0, 2.0], [1.0], resamples=100, seed=0)


def test_fusion_comparisons_reach_metrics_table_and_mlflow():
    psnr = {"dat": [30.0, 31.0, 29.0], "dat+se": [30.2, 31.1, 29.1], "rfdn": [29.0, 30.0, 28.5],
            "rfdn+se": [29.1, 30.2, 28.6], "fusion": [30.3, 31.1, 29.0], "bicubic": [27.0, 28.0, 26.0]}
    cmp = model_comparisons(psnr, ["dat", "rfdn"], self_ensemble=True, resamples=1000, seed=0)
    assert list(cmp) == ["fusion vs dat", "fusion vs dat+se", "fusion vs rfdn", "fusion vs rfdn+se",
                         "dat+se vs dat", "rfdn+se vs rfdn"]
    assert cmp["fusion vs rfdn"]["verdict"] == "better" and cmp["fusion vs dat+se"]["ties"] == 1
    assert list(model_comparisons(psnr, ["dat", "rfdn"], self_ensemble=False, resamples=1000, seed=0)) == [
        "fusion vs dat", "fusion vs rfdn"]

    table = comparison_table({"test": cmp})
    assert "| test | fusion vs rfdn | +0.9667 |" in table
    assert "test: only 3 images: the interval is wide and its coverage poor." in table
    flat = flat_scores({"sets": {"test": {"num_images": 3}}, "val": {}, "comparisons": {"test": cmp}})
    assert flat["test.fusion_vs_rfdn.mean_diff"] == 0.9667 and flat["test.dat+se_vs_dat.wins"] == 3
    assert not any(isinstance(v, str) for v in flat.values())
