"""Comparison panels of the score stage: the crops are where they should be, and the PNGs are deterministic."""
from __future__ import annotations

import numpy as np
import torch

from srmodels.evaluation import evaluation
from srmodels.data.member_outputs import save_output
from srmodels.evaluation.evaluation import _best_window, write_panels
from srmodels.data.images import read_image, write_image
from srmodels.data.imresize import downscale_uint8
from srmodels.evaluation.report import weight_map_image


def test_best_window_finds_the_peak_and_avoids_the_excluded_one():
    score = np.zeros((40, 50))
    score[5:13, 30:38] = 1.0   # the strongest place
    score[25:33, 2:10] = 0.5   # the next, elsewhere
    assert _best_window(score, 8) == (5, 30)
    assert _best_window(score, 8, exclude=(5, 30)) == (25, 2)
    assert _best_window(np.ones((8, 8)), 8, exclude=(0, 0)) == (0, 0)  # nowhere else to go


def test_panels_show_where_members_disagree_and_where_fusion_gains(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    hr = (rng.random((96, 96, 3)) * 200 + 20).astype(np.uint8)
    prepared, cache, test_dir = tmp_path / "prepared", tmp_path / "cache", tmp_path / "test"
    write_image(prepared / "eval" / "test" / "hr" / "img.png", hr)
    write_image(prepared / "eval" / "test" / "lr" / "img.png", downscale_uint8(hr, 4))
    exact = torch.from_numpy(hr.transpose(2, 0, 1).astype(np.float32) / 255)[None]
    a, b = exact.clone(), exact.clone()
    a[..., :48, :48] += 0.2    # 'a' is wrong at the top left (it is the best member overall: smaller error)
    b[..., 48:, 48:] += 0.3    # 'b' is wrong at the bottom right, by more
    save_output(cache / "a" / "eval_se" / "test" / "img.npy", a)
    save_output(cache / "b" / "eval_se" / "test" / "img.npy", b)
    write_image(test_dir / "sr" / "test" / "img.png", hr)  # the fusion got it right everywhere
    write_image(test_dir / "weights" / "test" / "img.png", weight_map_image(np.ones((2, 96, 96)) / 2, ["a", "b"]))

    kwargs = dict(scale=4, self_ensemble=True)
    first = write_panels(["a", "b"], cache, prepared, test_dir, tmp_path / "p1", **kwargs)
    again = write_panels(["a", "b"], cache, prepared, test_dir, tmp_path / "p2", **kwargs)
    assert [p.relative_to(tmp_path / "p1") for p in first] == [p.relative_to(tmp_path / "p2") for p in again]
    assert first[0].read_bytes() == again[0].read_bytes()  # deterministic
    panel = read_image(first[0])
    # Two rows of 6 crops (HR, bicubic, a+se, b+se, fusion, weights), 144 px each, with a legend strip below.
    assert panel.shape[1] == 6 * (144 + 4) + 4 and panel.shape[0] > 2 * 144

    # The disagreement crop sits where one member is wrong; the fusion-gain crop where the best member ('a',
    # smaller error overall) is wrong, not on top of the first crop.
    picked = []

    def spy(score, size, exclude=None):
        picked.append(_best_window(score, size, exclude))
        return picked[-1]

    monkeypatch.setattr(evaluation, "_best_window", spy)
    write_panels(["a", "b"], cache, prepared, test_dir, tmp_path / "p3", **kwargs)
    disagree, gain = picked
    assert disagree != gain
    gy, gx = gain
    assert gy < 48 and gx < 48  # inside a's wrong quadrant (a window of 48 starting there overlaps it most)
