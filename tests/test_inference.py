"""Self-ensemble and tiled inference with a tiny conv + pixel-shuffle model and recording mock models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srmodels.models.inference import (
    TRANSFORMS,
    apply_transform,
    invert_transform,
    self_ensemble,
    tile_starts,
    tiled_forward,
    upscale,
)

from .helpers import SCALE, seeded_rand

class TinySR(nn.Module):
    """Two 3x3 convs and a pixel shuffle: receptive-field radius 2 LR pixels, not rotation-equivariant."""

    def __init__(self, scale: int = SCALE) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv2(F.leaky_relu(self.conv1(x), 0.1)))


class Recorder:
    """Mock model: nearest upsampling that records the input shape of every call."""

    def __init__(self, scale: int = SCALE) -> None:
        self.scale = scale
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")

    @property
    def pixels(self) -> int:
        return sum(s[0] * s[2] * s[3] for s in self.shapes)


@pytest.fixture(autouse=True)
def _single_thread(_threads):
    # These models are a few hundred FLOPs per pixel: thread start-up and synchronisation dominate, and on a
    # busy 2-core machine two threads make each forward ~100x slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_sr() -> TinySR:
    torch.manual_seed(0)
    return TinySR().eval()


def _dyadic(*shape: int, seed: int = 0) -> torch.Tensor:
    # Multiples of 1/256: sums of up to 8 of them are exact in float32, so exactness tests are bitwise.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 256


def _nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=SCALE, mode="nearest")


def test_transforms_invert_exactly():
    x = seeded_rand(2, 3, 5, 7)
    assert len(set(TRANSFORMS)) == 8
    for rot, flip in TRANSFORMS:
        t = apply_transform(x, rot, flip)
        assert t.shape[-2:] == ((5, 7) if rot % 2 == 0 else (7, 5))
        assert torch.equal(invert_transform(t, rot, flip), x)
    # The eight transforms are distinct (an asymmetric input gives eight different images).
    outs = {tuple(apply_transform(x, r, f).flatten().tolist()) for r, f in TRANSFORMS if r % 2 == 0}
    assert len(outs) == 4
    # The identity's inverse is fresh memory: the ensemble accumulates into it in place.
    assert invert_transform(x, 0, False).data_ptr() != x.data_ptr()


@pytest.mark.parametrize("batch_transforms", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 6, 6), (2, 3, 5, 9)])
def test_self_ensemble_of_equivariant_model_is_identity(shape, batch_transforms):
    x = _dyadic(*shape)
    out = self_ensemble(_nearest, x, batch_transforms=batch_transforms)
    assert torch.equal(out, _nearest(x))


def test_self_ensemble_cost_and_batching():
    x = seeded_rand(2, 3, 5, 9)
    rec = Recorder()
    self_ensemble(rec, x, batch_transforms=False)
    assert len(rec.shapes) == 8 and all(s[0] == 2 for s in rec.shapes)
    assert rec.pixels == 8 * 2 * 5 * 9  # exactly 8 forwards: well under the 8.5x budget
    rec = Recorder()
    self_ensemble(rec, x, batch_transforms=True)
    assert sorted(rec.shapes) == [(8, 3, 5, 9), (8, 3, 9, 5)]
    rec = Recorder()
    self_ensemble(rec, seeded_rand(1, 3, 7, 7), batch_transforms=True)
    assert rec.shapes == [(8, 3, 7, 7)]
    rec = Recorder()
    self_ensemble(rec, seeded_rand(1, 3, 7, 7))  # CPU default: one transform at a time
    assert len(rec.shapes) == 8


def test_self_ensemble_properties(tiny_sr):
    x = seeded_rand(1, 3, 7, 10)
    with torch.no_grad():
        ens = self_ensemble(tiny_sr, x)
        assert ens.shape == (1, 3, 28, 40)
        # Equal to the average written out by hand.
        manual = sum(invert_transform(tiny_sr(apply_transform(x, r, f)), r, f) for r, f in TRANSFORMS) / 8
        torch.testing.assert_close(ens, manual, atol=1e-6, rtol=0)
        # Equivariant: ensembling a transformed input gives the transformed ensemble.
        for rot, flip in TRANSFORMS:
            got = self_ensemble(tiny_sr, apply_transform(x, rot, flip))
            torch.testing.assert_close(got, apply_transform(ens, rot, flip), atol=1e-5, rtol=0)
        # Idempotent: the ensemble of the ensembled model is the ensemble.
        torch.testing.assert_close(self_ensemble(lambda t: self_ensemble(tiny_sr, t), x), ens, atol=1e-5, rtol=0)
        # Batched and one-at-a-time agree; the model itself is not equivariant, so the ensemble differs.
        torch.testing.assert_close(self_ensemble(tiny_sr, x, batch_transforms=True), ens, atol=1e-5, rtol=0)
        assert (ens - tiny_sr(x)).abs().max() > 1e-3


def test_self_ensemble_batch_safe(tiny_sr):
    x = seeded_rand(2, 3, 9, 6)
    with torch.no_grad():
        for bt in (False, True):
            both = self_ensemble(tiny_sr, x, batch_transforms=bt)
            one = torch.cat([self_ensemble(tiny_sr, x[i : i + 1], batch_transforms=bt) for i in range(2)])
            torch.testing.assert_close(both, one, atol=1e-5, rtol=0)


def test_tile_starts_shift_last_tile_inside():
    assert tile_starts(10, 16, 12) == [0]
    assert tile_starts(21, 8, 4) == [0, 4, 8, 12, 13]
    assert tile_starts(20, 8, 4) == [0, 4, 8, 12]
    assert tile_starts(9, 8, 6) == [0, 1]


def test_tiled_whole_image_is_bitwise_untiled(tiny_sr):
    x = seeded_rand(2, 3, 13, 11)
    with torch.no_grad():
        ref = tiny_sr(x)
        for tile in (13, 20):
            assert torch.equal(tiled_forward(tiny_sr, x, SCALE, tile, 4), ref)
    rec = Recorder()
    tiled_forward(rec, x, SCALE, 16, 4)
    assert rec.shapes == [(2, 3, 13, 11)]


@pytest.mark.parametrize(
    "shape,tile,overlap",
    [((1, 3, 21, 27), 8, 4), ((2, 3, 21, 27), 10, 6), ((1, 3, 16, 40), 12, 4), ((1, 3, 9, 30), 16, 5)],
)
def test_tiled_matches_untiled_for_local_model(tiny_sr, shape, tile, overlap):
    # TinySR's receptive-field radius is 2 <= overlap // 2, so every kept pixel sees its true neighbourhood.
    x = seeded_rand(*shape, seed=1)
    with torch.no_grad():
        ref = tiny_sr(x)
        out = tiled_forward(tiny_sr, x, SCALE, tile, overlap)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_tiled_too_small_overlap_is_not_exact(tiny_sr):
    # With overlap 0 tile seams see zero padding: proves the test above is sensitive.
    x = seeded_rand(1, 3, 21, 27, seed=2)
    with torch.no_grad():
        assert (tiled_forward(tiny_sr, x, SCALE, 8, 0) - tiny_sr(x)).abs().max() > 1e-3


def test_tiled_exact_for_pointwise_model_and_bounded_tiles():
    x = _dyadic(2, 3, 23, 17)
    rec = Recorder()
    out = tiled_forward(rec, x, SCALE, 6, 2)
    assert torch.equal(out, _nearest(x))
    # one fixed-size window (tile + 2 * overlap) at a time, edge windows shifted inside the image
    assert all(s == (2, 3, 10, 10) for s in rec.shapes)
    assert len(rec.shapes) == len(tile_starts(23, 6, 6)) * len(tile_starts(17, 6, 6))


def test_tiled_batch_safe_and_errors(tiny_sr):
    x = seeded_rand(2, 3, 19, 14, seed=3)
    with torch.no_grad():
        both = tiled_forward(tiny_sr, x, SCALE, 8, 4)
        one = torch.cat([tiled_forward(tiny_sr, x[i : i + 1], SCALE, 8, 4) for i in range(2)])
    torch.testing.assert_close(both, one, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="overlap must be >= 0, got -1"):
        tiled_forward(tiny_sr, x, SCALE, 8, -1)
    with pytest.raises(ValueError, match="tile must be >= 1, got 0"):
        tiled_forward(tiny_sr, x, SCALE, 0, 4)
    with pytest.raises(ValueError, match=r"expected \(2, C, 32, 28\) for scale 2"):
        tiled_forward(tiny_sr, x, 2, 8, 4)  # wrong scale for the model
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\) tensor, got shape \(3, 19, 14\)"):
        tiled_forward(tiny_sr, x[0], SCALE, 8, 4)


def test_upscale_combinations(tiny_sr):
    x = seeded_rand(1, 3, 15, 22, seed=4)
    with torch.no_grad():
        plain = tiny_sr(x)
        ens = self_ensemble(tiny_sr, x)
    out = upscale(tiny_sr, x, SCALE)
    assert out.is_inference() and torch.equal(out, plain)
    torch.testing.assert_close(upscale(tiny_sr, x, SCALE, tile=8, tile_overlap=4), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(upscale(tiny_sr, x, SCALE, self_ensemble=True), ens, atol=1e-6, rtol=0)
    for bt in (False, True):
        got = upscale(tiny_sr, x, SCALE, self_ensemble=True, tile=8, tile_overlap=4, batch_transforms=bt)
        torch.testing.assert_close(got, ens, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"output shape \(1, 3, 60, 88\) does not match input \(1, 3, 15, 22\) x2"):
        upscale(tiny_sr, x, 2)


def test_upscale_keeps_grad_when_wanted(tiny_sr):
    x = seeded_rand(1, 3, 12, 12, seed=5).requires_grad_()
    out = upscale(tiny_sr, x, SCALE, self_ensemble=True, tile=8, tile_overlap=4)
    assert out.requires_grad and not out.is_inference()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_half_precision_outputs_accumulate_in_float32(tiny_sr):
    x = seeded_rand(1, 3, 9, 12, seed=6)

    def half_model(t: torch.Tensor) -> torch.Tensor:
        return tiny_sr(t).to(torch.bfloat16)

    def widened(t: torch.Tensor) -> torch.Tensor:
        return half_model(t).float()

    with torch.no_grad():
        ens = self_ensemble(half_model, x)
        assert ens.dtype == torch.bfloat16
        # Summed in float32, rounded to bf16 once: equal to the float32 ensemble of the same bf16 outputs.
        assert torch.equal(ens, self_ensemble(widened, x).to(torch.bfloat16))
        tiled = tiled_forward(half_model, x, SCALE, 8, 4)
        assert tiled.dtype == torch.bfloat16
        assert torch.equal(tiled, tiled_forward(widened, x, SCALE, 8, 4).to(torch.bfloat16))
