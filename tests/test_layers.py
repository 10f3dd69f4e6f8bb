"""srmodels.archs._layers: the fused inference path gives what the plain layers give."""
import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srmodels.archs import _layers
from srmodels.archs._layers import linear, linear_add, linear_gelu, toom_cook_matrices, winograd_conv3x3


def test_linear_gelu_matches_plain_layers():
    torch.manual_seed(0)
    fc, act = nn.Linear(30, 60), nn.GELU()
    x = torch.randn(2, 50, 30)
    with torch.inference_mode():
        fused = linear_gelu(x, fc, act)
    torch.testing.assert_close(fused, act(fc(x)), rtol=1e-6, atol=1e-6)
    # Training keeps autograd's two-op path.
    y = linear_gelu(x.requires_grad_(), fc, act)
    assert y.grad_fn is not None and "Gelu" in type(y.grad_fn).__name__
    # tanh-approximate GELU is never handed to the exact fused kernel.
    tanh = nn.GELU(approximate="tanh")
    with torch.inference_mode():
        torch.testing.assert_close(linear_gelu(x.detach(), fc, tanh), tanh(fc(x.detach())))


@pytest.mark.skipif(_layers._REORDER_LINEAR_WEIGHT is None, reason="this torch build has no oneDNN weight packing")
def test_linear_packs_each_weight_once_and_repacks_after_every_change(monkeypatch):
    packs = []
    real = _layers._REORDER_LINEAR_WEIGHT
    monkeypatch.setattr(_layers, "_REORDER_LINEAR_WEIGHT", lambda w, rows: packs.append(1) or real(w, rows))
    torch.manual_seed(0)
    fc = nn.Linear(180, 96)
    x, r = torch.randn(2, 40, 180), torch.randn(2, 40, 96)

    def check():
        # Against float64, within the worst-case float32 bound of any summation order, (n + 2) u sum|x w| per
        # element (n = 180 products, the bias and the residual): the packed oneDNN kernel and the CPU's own
        # sgemm may each take any order, and do differ by up to 1e-5 on SSE4.1 kernels.
        with torch.inference_mode():
            ref = F.linear(x.double(), fc.weight.double(), fc.bias.double())
            scale = F.linear(x.double().abs(), fc.weight.double().abs(), fc.bias.double().abs())
            bound = (180 + 2) * 2.0 ** -24 * (scale + r.double().abs())
            assert ((linear(x, fc).double() - ref).abs() <= bound).all()
            assert ((linear_add(x, fc, r).double() - ref - r.double()).abs() <= bound).all()
            # GELU's slope is at most 1.13; its own float32 evaluation adds a few units of the last place.
            gelu = linear_gelu(x, fc, nn.GELU()).double()
            assert ((gelu - F.gelu(ref)).abs() <= 1.13 * bound + 8 * 2.0 ** -24 * gelu.abs()).all()

    check()
    check()
    assert len(packs) == 1  # one packing serves every later call with this weight
    with torch.no_grad():
        fc.weight.mul_(-0.5)  # what an optimizer step does: in place, version bumped
    check()
    assert len(packs) == 2
    fc.load_state_dict(nn.Linear(180, 96).state_dict())
    check()
    assert len(packs) == 3
    fc.weight = nn.Parameter(torch.randn(96, 180))
    check()
    assert len(packs) == 4
    other = nn.Linear(180, 96)  # each module keeps its own
    with torch.inference_mode():
        linear(x, other)
    check()
    assert len(packs) == 5


@pytest.mark.skipif(_layers._REORDER_CONV_WEIGHT is None, reason="this torch build has no oneDNN conv packing")
def test_direct_conv2d_packs_once_matches_nn_conv2d_and_follows_updates(monkeypatch):
    packs = []
    real = _layers._REORDER_CONV_WEIGHT
    monkeypatch.setattr(_layers, "_REORDER_CONV_WEIGHT", lambda w, *a: packs.append(1) or real(w, *a))
    torch.manual_seed(0)
    conv = _layers.DirectConv2d(24, 8, 3, 1, 1)
    plain = nn.Conv2d(24, 8, 3, 1, 1)
    x = torch.randn(2, 24, 13, 9)
    for step in range(2):
        plain.load_state_dict(conv.state_dict())
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:1, :, :7, :5]):
            with torch.inference_mode():
                torch.testing.assert_close(conv(inp), plain(inp), rtol=1e-5, atol=1e-5)  # summation order
        assert len(packs) == step + 1  # once per weight version, whatever the input size or layout
        with torch.no_grad():
            conv.weight.mul_(-3.0)
    # Hooks see the conv's own output (the fast path stays inside forward); training keeps autograd.
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        conv(x)
    assert seen == [(2, 8, 13, 9)]
    assert conv(x).grad_fn is not None


def test_winograd_kernel_transform_follows_weight_updates():
    torch.manual_seed(0)
    conv = _layers.Conv2d(128, 128, 3, 1, 1)
    x = torch.randn(1, 128, 9, 7)
    for _ in range(2):
        with torch.inference_mode():
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            conv.weight.mul_(-2.0)


def test_linear_and_linear_add_match_plain_layers():
    torch.manual_seed(0)
    fc = nn.Linear(24, 40)
    x, r = torch.randn(3, 7, 24), torch.randn(3, 7, 40)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, fc), fc(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(linear_add(x, fc, r), fc(x) + r, rtol=1e-6, atol=1e-6)
    y = linear_add(x.requires_grad_(), fc, r)
    y.sum().backward()
    assert fc.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("n,c_in,c_out,h,w", [(1, 8, 5, 9, 7), (2, 16, 16, 10, 12), (1, 3, 4, 1, 1), (1, 5, 6, 2, 3)])
def test_winograd_conv3x3_matches_direct_convolution(n, c_in, c_out, h, w):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, 1, 1)
    x = torch.randn(n, c_in, h, w)
    with torch.inference_mode():
        ref = conv(x)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = winograd_conv3x3(inp, conv.weight, conv.bias)
            assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(winograd_conv3x3(x, conv.weight, None), ref - conv.bias.view(1, -1, 1, 1),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,points", [(4, (0, 1, -1, 2, Fraction(-1, 2))), (2, (0, 1, -1)), (3, (0, 1, -1, 2))])
def test_toom_cook_matrices_compute_the_correlation_exactly(m, points):
    a_t, g, b_t = toom_cook_matrices(m, 3, [Fraction(p) for p in points])
    rng = random.Random(0)
    d = [Fraction(rng.randint(-9, 9)) for _ in range(m + 2)]
    k = [Fraction(rng.randint(-9, 9)) for _ in range(3)]
    gk = [sum(row[j] * k[j] for j in range(3)) for row in g]
    bd = [sum(row[j] * d[j] for j in range(m + 2)) for row in b_t]
    y = [sum(row[j] * gk[j] * bd[j] for j in range(m + 2)) for row in a_t]
    assert y == [sum(d[i + j] * k[j] for j in range(3)) for i in range(m)]
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook_matrices(m, 3, [Fraction(0)] * (m + 1))


def test_winograd_error_on_wide_layers_is_within_its_float32_budget():
    # An absolute budget against a float64 reference, so the verdict does not depend on the CPU: measured
    # 10.4-11.6 units of u * max(sum |x w|) (u = 2^-24, the float32 unit roundoff; one unit is the rounding of
    # the largest partial sum any float32 convolution accumulates) with AVX-512, AVX2 and SSE4.1 kernels. The
    # textbook points 0, +-1, +-2 measured 2.5x more and fail it; the direct convolution itself measured 0.7-7.6
    # units depending on the CPU, which is why it is no yardstick. 20 units (2.1e-5 here) keeps a whole SwinIR-M
    # or DAT-S forward within the 5e-5 conformance tolerance (measured 1.0e-5 / 1.3e-5 from the direct path).
    torch.manual_seed(0)
    conv = nn.Conv2d(180, 180, 3, 1, 1)
    x = torch.randn(1, 180, 23, 30)
    with torch.inference_mode():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        unit = 2.0 ** -24 * F.conv2d(x.double().abs(), conv.weight.double().abs(), padding=1).max().item()
        wino = (winograd_conv3x3(x, conv.weight, conv.bias).double() - ref).abs().max().item()
    assert wino < 20 * unit, (wino / unit, unit)


def test_winograd_chunks_give_the_unchunked_result(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 7, 3, 1, 1)
    x = torch.randn(1, 6, 21, 18)
    with torch.inference_mode():
        whole = winograd_conv3x3(x, conv.weight, conv.bias)
        monkeypatch.setattr(_layers, "_WINOGRAD_CHUNK_BYTES", 1)  # one tile row per chunk
        torch.testing.assert_close(winograd_conv3x3(x, conv.weight, conv.bias), whole, rtol=0, atol=0)


def test_conv2d_takes_winograd_only_for_wide_float32_cpu_inference(monkeypatch):
    calls = []
    real = _layers.winograd_conv3x3
    monkeypatch.setattr(_layers, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    wide = _layers.Conv2d(128, 128, 3, 1, 1)
    plain = nn.Conv2d(128, 128, 3, 1, 1)
    plain.load_state_dict(wide.state_dict())
    x = torch.randn(1, 128, 6, 5)
    with torch.inference_mode():
        torch.testing.assert_close(wide(x), plain(x), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    # Training (autograd), narrow layers and other kernel shapes are nn.Conv2d's own forward.
    assert torch.equal(wide(x), plain(x)) and wide(x).grad_fn is not None
    narrow = _layers.Conv2d(128, 32, 3, 1, 1)  # one side under 64 channels
    square64 = _layers.Conv2d(64, 64, 3, 1, 1)  # neither side 128 wide
    strided = _layers.Conv2d(128, 128, 3, 2, 1)
    with torch.inference_mode():
        narrow(x), square64(torch.randn(1, 64, 6, 5)), strided(x)
        assert calls == [1]
        _layers.Conv2d(64, 256, 3, 1, 1)(torch.randn(1, 64, 6, 5))  # the upsampler's conv
    assert calls == [1, 1]
    assert list(wide.state_dict()) == ["weight", "bias"]


def test_fast_paths_step_aside_while_torch_compile_traces(monkeypatch):
    # Dynamo cannot trace the oneDNN ops: a compiled model must see the plain layers.
    calls = []
    monkeypatch.setattr(_layers, "winograd_conv3x3", lambda *a: calls.append(1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    conv, fc = _layers.Conv2d(128, 128, 3, 1, 1), nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        conv(torch.randn(1, 128, 6, 5))
        assert not _layers._onednn_inference(x, fc)
    assert calls == []
