"""RFDN conformance: official state_dict layout, official outputs, the released AIM 2020 weights, strictness."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from srmodels.archs.rfdn import MIN_INPUT_SIZE, RFDN

from .helpers import (PORT_ATOL, assert_intermediates_match, assert_matches_manifest, load_pt, manifest,
                     public_model, reference_path)

RELEASED_ATOL = 1e-2  # outputs on the 0-255 scale
PUBLIC = ("fixtures", "rfdn", "public")
RELEASED = ("fixtures", "rfdn", "released_RFDN_AIM")
TINY = dict(in_nc=3, nf=8, num_modules=4, out_nc=3, upscale=4)


@pytest.fixture(scope="module")
def public_rfdn() -> RFDN:
    return public_model("rfdn", RFDN)


# --- structure -------------------------------------------------------------------------------------------


def test_rfdn_state_dict_matches_manifest() -> None:
    spec = manifest("rfdn")
    model = RFDN(**spec["constructor_kwargs"])
    assert_matches_manifest(model, spec)
    assert spec["num_parameters"] == 433_448


def test_rfdn_constructor_signature_is_official() -> None:
    params = inspect.signature(RFDN).parameters
    assert {k: p.default for k, p in params.items()} == dict(in_nc=3, nf=50, num_modules=4, out_nc=3, upscale=4)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    with pytest.raises(TypeError):
        RFDN(scale=4)  # type: ignore[call-arg]


# --- official outputs ------------------------------------------------------------------------------------


def test_rfdn_public_outputs(public_rfdn: RFDN) -> None:
    inputs = load_pt(reference_path(*PUBLIC, "inputs.pt"))
    outputs = load_pt(reference_path(*PUBLIC, "outputs.pt"))
    assert set(inputs) == set(outputs)
    with torch.inference_mode():
        for name, x in inputs.items():
            out = public_rfdn(x)
            assert out.shape == outputs[name].shape, name
            assert torch.allclose(out, outputs[name], atol=PORT_ATOL, rtol=0), \
                f"{name}: max |diff| {(out - outputs[name]).abs().max().item():.3g}"


def test_rfdn_public_intermediates(public_rfdn: RFDN) -> None:
    assert_intermediates_match(public_rfdn, reference_path(*PUBLIC), PORT_ATOL)


def test_released_rfdn_aim_weights() -> None:
    """RFDN() with the official RFDN_AIM.pth (bare legacy state_dict) on 0-255 inputs, as upstream's test.py."""
    state = torch.load(reference_path("weights", "RFDN_AIM.pth"), map_location="cpu", weights_only=True)
    model = RFDN()
    model.load_state_dict(state, strict=True)
    model.eval()
    inputs = load_pt(reference_path(*RELEASED, "inputs.pt"))
    outputs = load_pt(reference_path(*RELEASED, "outputs.pt"))
    with torch.inference_mode():
        for name, x in inputs.items():
            out = model(x)
            assert torch.allclose(out, outputs[name], atol=RELEASED_ATOL, rtol=0), \
                f"{name}: max |diff| {(out - outputs[name]).abs().max().item():.3g}"


# --- strictness and quirks -------------------------------------------------------------------------------


def test_rfdn_strict_load_rejects_missing_and_unexpected_keys() -> None:
    model = RFDN(**TINY)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "B4.esa.conv4.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        RFDN(**TINY).load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        RFDN(**TINY).load_state_dict({**state, "B5.c1_d.weight": state["B1.c1_d.weight"]}, strict=True)


@pytest.mark.parametrize("num_modules", [1, 3, 5, 8])
def test_num_modules_other_than_four_is_refused(num_modules: int) -> None:
    with pytest.raises(ValueError, match="num_modules"):
        RFDN(**{**TINY, "num_modules": num_modules})


def test_upscale_is_ignored_like_upstream() -> None:
    torch.manual_seed(0)
    x4 = RFDN(**TINY).eval()
    x2 = RFDN(**{**TINY, "upscale": 2}).eval()
    x2.load_state_dict(x4.state_dict(), strict=True)
    x = torch.rand(1, 3, 16, 18)
    with torch.inference_mode():
        assert x2(x).shape == (1, 3, 64, 72)
        assert torch.equal(x2(x), x4(x))
    assert x2.scale == 4


def test_small_inputs_give_a_clear_error() -> None:
    model = RFDN(**TINY).eval()
    with torch.inference_mode():
        model(torch.rand(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        for shape in [(1, 3, MIN_INPUT_SIZE - 1, 20), (1, 3, 20, MIN_INPUT_SIZE - 1)]:
            with pytest.raises(ValueError, match="H, W >= 15"):
                model(torch.rand(shape))


def test_forward_leaves_input_alone_and_trains() -> None:
    """In-place activations must touch only fresh tensors: input intact, autograd still valid."""
    torch.manual_seed(0)
    model = RFDN(**TINY)
    x = torch.rand(2, 3, 16, 17)
    before = x.clone()
    model(x).square().mean().backward()
    assert torch.equal(x, before)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert isinstance(model.c[1], nn.LeakyReLU) and model.c[1].negative_slope == 0.05
