"""Training-free fusions and HR oracles (srmodels.evaluation.ensembles): exactness, definitions, determinism."""
from __future__ import annotations

import itertools

import pytest
import torch

from srmodels.evaluation import ensembles as E
from srmodels.evaluation.ensembles import (NormalEquations, least_squares_weights, oracle_convex, oracle_convex_luma,
                                oracle_pixel_best, per_image_best_index, uniform_mean, weighted)

from .helpers import seeded_rand


def _d2(img: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared RGB distance, float64."""
    diff = img.double() - hr.double()
    return (diff * diff).sum(0)


# ------------------------------------------------------------------------------------------ brute force reference
def _simplex_grid(n: int, k: int) -> torch.Tensor:
    """Every weight vector with entries in {0, 1/k, ..., 1} summing to one: (M, n) float64."""
    pts = [c for c in itertools.product(range(k + 1), repeat=n - 1) if sum(c) <= k]
    return torch.tensor([[*c, k - sum(c)] for c in pts], dtype=torch.float64) / k


def _grid_search(cands: torch.Tensor, hr: torch.Tensor, levels: int = 9) -> torch.Tensor:
    """Per-pixel min squared RGB distance over the simplex by zooming grid search: a grid over the whole simplex,
    then finer local grids around the best point so far. (P,) for cands (N, 3, P), hr (3, P)."""
    n, _, p = cands.shape
    c = cands.double().permute(2, 0, 1)   # (P, N, 3)
    h = hr.double().T                     # (P, 3)

    def dist(w: torch.Tensor) -> torch.Tensor:  # w: (P, M, N) -> (P, M)
        pts = torch.einsum("pmn,pnc->pmc", w, c)
        return ((pts - h[:, None]) ** 2).sum(-1)

    k0 = {2: 400, 3: 60, 4: 24, 5: 12}[n]
    grid = _simplex_grid(n, k0).expand(p, -1, -1)
    d = dist(grid)
    best = grid[torch.arange(p), d.argmin(1)]
    best_d = d.min(1).values
    radius_steps = {2: 40, 3: 12, 4: 6, 5: 4}[n]
    offsets = torch.tensor(list(itertools.product(range(-radius_steps, radius_steps + 1), repeat=n - 1)),
                           dtype=torch.float64)
    offsets = torch.cat([offsets, -offsets.sum(1, keepdim=True)], 1)  # sums to zero: stays on the plane
    step = 1.0 / k0
    for _ in range(levels):
        step = step * 3.0 / radius_steps  # the new window spans 3 old steps each side
        w = best[:, None] + step * offsets[None]
        w = torch.where((w >= 0).all(-1, keepdim=True), w, best[:, None])
        d = dist(w)
        i = d.argmin(1)
        improved = d[torch.arange(p), i] < best_d
        best = torch.where(improved[:, None], w[torch.arange(p), i], best)
        best_d = torch.where(improved, d[torch.arange(p), i], best_d)
    return best_d


@pytest.mark.parametrize("n", [2, 3, 4])
def test_convex_oracle_equals_grid_search(n):
    cands, hr = seeded_rand(n, 3, 4, 5, seed=n), seeded_rand(3, 4, 5, seed=10 + n)
    image, weights = oracle_convex(cands, hr)
    got = _d2(image, hr).reshape(-1)
    grid = _grid_search(cands.reshape(n, 3, -1), hr.reshape(3, -1))
    assert (got <= grid + 1e-12).all(), "a grid point beats the oracle"
    assert (grid - got).max() < 1e-6
    # the image is the weighting of the members it reports
    assert torch.allclose(image, (cands.double() * weights[:, None]).sum(0), atol=1e-15, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_convex_oracle_satisfies_kkt(n):
    """Optimality certificate of the convex problem: with g_i = c_i . (p - h), every member has g_i >= min g, and
    members with weight > 0 have g_i = min g."""
    cands, hr = seeded_rand(n, 3, 6, 7, seed=20 + n), seeded_rand(3, 6, 7, seed=30 + n)
    image, weights = oracle_convex(cands, hr)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(0), torch.ones(6, 7, dtype=torch.float64), atol=1e-14, rtol=0)
    g = (cands.double() * (image - hr.double())[None]).sum(1)  # (N, H, W)
    slack = g - g.min(0).values
    assert (slack >= -1e-12).all()
    assert (slack[weights > 1e-9] < 1e-9).all()


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_convex_oracle_is_never_worse_than_the_others(n):
    cands, hr = seeded_rand(n, 3, 8, 8, seed=40 + n), seeded_rand(3, 8, 8, seed=50 + n)
    image, _ = oracle_convex(cands, hr)
    best = _d2(image, hr)
    others = [_d2(c, hr) for c in cands] + [_d2(oracle_pixel_best(cands, hr)[0], hr), _d2(uniform_mean(cands), hr)]
    for other in others:
        assert (best <= other + 1e-15).all()  # per pixel, hence also in MSE
    assert best.sum() < min(o.sum() for o in others)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_convex_oracle_reproduces_hr_inside_the_hull(n):
    cands = seeded_rand(n, 3, 6, 6, seed=60 + n)
    w = seeded_rand(n, 6, 6, seed=70 + n).double()
    w = w / w.sum(0)
    hr = (cands.double() * w[:, None]).sum(0)  # in the hull (for n = 3, on the triangle's plane)
    image, weights = oracle_convex(cands, hr)
    assert (image - hr).abs().max() < 1e-14
    if n <= 4:  # affinely independent members: the weights are unique
        assert (weights - w).abs().max() < 1e-12
    # HR on a vertex: that member alone
    image, weights = oracle_convex(cands, cands[1].double())
    assert torch.equal(image, cands[1].double())
    assert torch.equal(weights, torch.eye(n, dtype=torch.float64)[1][:, None, None].expand(n, 6, 6))


def test_convex_oracle_with_identical_members():
    a, b = seeded_rand(3, 5, 6, seed=1), seeded_rand(3, 5, 6, seed=2)
    hr = seeded_rand(3, 5, 6, seed=3)
    image3, w3 = oracle_convex(torch.stack([a, a, b]), hr)
    image2, w2 = oracle_convex(torch.stack([a, b]), hr)
    assert torch.equal(image3, image2)  # the duplicate's faces are flat: the same faces decide
    assert torch.equal(w3[1], torch.zeros_like(w3[1]))  # ties: the lower index
    assert torch.equal(w3[[0, 2]], w2)
    # all members identical: the first, everywhere
    image, w = oracle_convex(torch.stack([a, a, a]), hr)
    assert torch.equal(image, a.double()) and torch.equal(w[0], torch.ones_like(w[0]))


def test_convex_oracle_with_a_collinear_member():
    a, b = seeded_rand(3, 5, 6, seed=4), seeded_rand(3, 5, 6, seed=5)
    hr = seeded_rand(3, 5, 6, seed=6)
    mid = (a.double() + b.double()) / 2
    image, w = oracle_convex(torch.stack([a.double(), b.double(), mid]), hr)
    ref, _ = oracle_convex(torch.stack([a, b]), hr)
    assert torch.allclose(_d2(image, hr), _d2(ref, hr), atol=1e-15, rtol=0)
    assert torch.isfinite(w).all() and (w >= 0).all()


def test_convex_oracle_limits_and_shapes():
    with pytest.raises(ValueError, match="at most 5"):
        oracle_convex(seeded_rand(6, 3, 2, 2, seed=0), seeded_rand(3, 2, 2, seed=1))
    with pytest.raises(ValueError, match="HR"):
        oracle_convex(seeded_rand(3, 3, 2, 2, seed=0), seeded_rand(3, 2, 3, seed=1))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        oracle_convex(seeded_rand(3, 2, 2, seed=0), seeded_rand(3, 2, 2, seed=1))
    image, w = oracle_convex(seeded_rand(1, 3, 2, 2, seed=0), seeded_rand(3, 2, 2, seed=1))  # one member: itself
    assert torch.equal(w, torch.ones(1, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("fn", [oracle_convex, oracle_pixel_best, oracle_convex_luma])
def test_chunked_equals_unchunked_bitwise(fn):
    cands, hr = seeded_rand(4, 3, 11, 9, seed=7), seeded_rand(3, 11, 9, seed=8)
    whole = fn(cands, hr)
    for rows in (1, 2, 5, 11, 100):
        part = fn(cands, hr, chunk_rows=rows)
        assert all(torch.equal(x, y) for x, y in zip(whole, part)), rows


def test_rerun_and_thread_count_give_the_same_bits():
    cands, hr = seeded_rand(3, 3, 40, 30, seed=9), seeded_rand(3, 40, 30, seed=10)

    def everything():
        return [uniform_mean(cands), *oracle_convex(cands, hr), *oracle_pixel_best(cands, hr),
                *oracle_convex_luma(cands, hr), least_squares_weights([(cands, hr)], crop_border=2)]

    first = everything()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = everything()
    finally:
        torch.set_num_threads(threads)
    again = everything()
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------ other oracles
def test_pixel_best_nearest_member_and_ties():
    hr = torch.zeros(3, 1, 3)
    cands = torch.zeros(3, 3, 1, 3)
    cands[0, :, 0, 0], cands[1, :, 0, 0], cands[2, :, 0, 0] = 0.3, 0.1, 0.2  # member 1 nearest
    cands[0, 0, 0, 1], cands[1, 1, 0, 1], cands[2, 2, 0, 1] = 0.5, 0.5, 0.5  # equal distances: member 0
    cands[0, :, 0, 2], cands[1, 0, 0, 2], cands[2, :, 0, 2] = 0.1, 0.15, 0.2  # RGB distance, not per channel: 1
    image, index = oracle_pixel_best(cands, hr)
    assert index.tolist() == [[1, 0, 1]]
    assert torch.equal(image, torch.stack([cands[i, :, 0, j] for j, i in enumerate([1, 0, 1])], 1)[:, None].double())


def test_per_image_best_index():
    assert per_image_best_index([27.1, 27.3, 27.2]) == 1
    assert per_image_best_index([27.3, 27.1, 27.3]) == 0
    assert per_image_best_index([float("-inf"), float("inf")]) == 1
    with pytest.raises(ValueError, match="NaN among the scores"):
        per_image_best_index([27.0, float("nan")])


def _luma(x: torch.Tensor) -> torch.Tensor:
    return x[0] * 65.481 / 255 + x[1] * 128.553 / 255 + x[2] * 24.966 / 255


def test_luma_oracle_is_the_clamped_luma():
    cands, hr = seeded_rand(3, 3, 9, 8, seed=11), seeded_rand(3, 9, 8, seed=12)
    image, w = oracle_convex_luma(cands, hr)
    ys = torch.stack([_luma(c.double()) for c in cands])
    want = _luma(hr.double()).clamp(ys.min(0).values, ys.max(0).values)
    assert torch.allclose(_luma(image), want, atol=1e-14, rtol=0)
    assert (w >= 0).all() and torch.allclose(w.sum(0), torch.ones(9, 8, dtype=torch.float64), atol=1e-15, rtol=0)
    rgb, _ = oracle_convex(cands, hr)  # the RGB oracle is never nearer in luma
    assert ((_luma(image) - _luma(hr.double())).abs() <= (_luma(rgb) - _luma(hr.double())).abs() + 1e-14).all()


# ------------------------------------------------------------------------------------------ fixed fusions
def test_uniform_mean_and_weighted():
    cands = seeded_rand(3, 3, 4, 5, seed=13)
    assert torch.allclose(uniform_mean(cands), cands.double().mean(0), atol=1e-15, rtol=0)
    assert torch.allclose(weighted(cands, [1 / 3] * 3), uniform_mean(cands), atol=1e-15, rtol=0)
    assert torch.equal(weighted(cands, torch.tensor([0.0, 1.0, 0.0])), cands[1].double())
    with pytest.raises(ValueError, match="2 weights for 3 members"):
        weighted(cands, [0.5, 0.5])


def test_least_squares_recovers_known_weights():
    cands = seeded_rand(3, 3, 16, 16, seed=14)
    hr = 0.2 * cands[0].double() + 0.8 * cands[1].double()
    w = least_squares_weights([(cands, hr)])
    assert w.dtype == torch.float64
    assert torch.allclose(w, torch.tensor([0.2, 0.8, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    # an affine truth: unconstrained recovers it, and the sum-to-one fit too when it sums to one
    hr = 1.3 * cands[0].double() - 0.5 * cands[2].double()
    assert torch.allclose(least_squares_weights([(cands, hr)]), torch.tensor([1.3, 0.0, -0.5], dtype=torch.float64),
                          atol=1e-12, rtol=0)
    hr = 0.7 * cands[0].double() + 0.3 * cands[2].double()
    w1 = least_squares_weights([(cands, hr)], sum_to_one=True)
    assert torch.allclose(w1, torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64), atol=1e-12, rtol=0)


def test_least_squares_streaming_equals_one_fit():
    images = [(seeded_rand(3, 3, 6 + i, 7, seed=20 + i), seeded_rand(3, 6 + i, 7, seed=30 + i)) for i in range(4)]
    from_list = least_squares_weights(images)
    from_generator = least_squares_weights(pair for pair in images)
    assert torch.equal(from_list, from_generator)
    eq = NormalEquations()
    for c, h in images:
        eq.add(c, h)
    assert torch.equal(eq.solve(), from_list)
    # the same as one least-squares problem over every value of every image (LAPACK here only as a reference)
    design = torch.cat([c.double().reshape(3, -1).T for c, _ in images])
    target = torch.cat([h.double().reshape(-1) for _, h in images])
    ref = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    assert torch.allclose(from_list, ref, atol=1e-12, rtol=0)
    # and it is the minimum: the accumulated MSE grows away from it
    base = eq.mse(from_list)
    assert abs(base - ((design @ from_list - target) ** 2).mean().item()) < 1e-12
    for i in range(3):
        nudged = from_list.clone()
        nudged[i] += 1e-3
        assert eq.mse(nudged) > base


def test_least_squares_ignores_the_border():
    cands = seeded_rand(2, 3, 12, 12, seed=15)
    hr = 0.4 * cands[0].double() + 0.6 * cands[1].double()
    hr[:, :2] = 1.0  # garbage in a 2-pixel border
    hr[:, :, -2:] = 0.0
    w = least_squares_weights([(cands, hr)], crop_border=2)
    assert torch.allclose(w, torch.tensor([0.4, 0.6], dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.allclose(least_squares_weights([(cands, hr)]), w, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="crop_border"):
        least_squares_weights([(cands, hr)], crop_border=6)


def test_least_squares_errors():
    a, b = seeded_rand(3, 5, 5, seed=16), seeded_rand(3, 5, 5, seed=17)
    with pytest.raises(ValueError, match="linearly dependent"):
        least_squares_weights([(torch.stack([a, a, b]), b.double())])
    with pytest.raises(ValueError, match="no images"):
        least_squares_weights([])
    with pytest.raises(ValueError, match="members after"):
        least_squares_weights([(torch.stack([a, b]), a), (torch.stack([a, b, b]), a)])


def test_tree_sum_is_pairwise():
    x = torch.tensor([1e16, 1.0, -1e16, 1.0, 3.0], dtype=torch.float64)
    # ((1e16 + -1e16) + (1 + 1)) + 3: the order is fixed by the length alone
    assert E._tree_sum(x) == ((1e16 + -1e16) + (1.0 + 1.0)) + 3.0
    assert E._tree_sum(torch.zeros(0, dtype=torch.float64)) == 0.0
