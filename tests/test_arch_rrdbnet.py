"""RRDBNet conformance: BasicSR state_dict layout, official outputs, scale 2/1 unshuffling, strictness."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from srmodels.models.accelerate import accelerate
from srmodels.archs.rrdbnet import RRDBNet

from .helpers import (PORT_ATOL, assert_intermediates_match, assert_matches_manifest, load_pt, manifest,
                     public_model, reference_path)

PUBLIC = ("fixtures", "rrdbnet", "public")
TINY = dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, num_grow_ch=4)


@pytest.fixture(scope="module")
def public_rrdbnet() -> RRDBNet:
    return public_model("rrdbnet", RRDBNet)


def _randomise_rrdbnet(model: RRDBNet, seed: int = 0) -> RRDBNet:
    """O(1) weights: the 0.1-scaled init would hide ordering mistakes behind the residuals."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model.eval()


def _unshuffle_by_reshape(x: torch.Tensor, r: int) -> torch.Tensor:
    """BasicSR's pixel_unshuffle written out: output channel c*r*r + dy*r + dx."""
    b, c, h, w = x.shape
    return x.view(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


# --- structure -------------------------------------------------------------------------------------------


def test_rrdbnet_state_dict_matches_manifest() -> None:
    spec = manifest("rrdbnet")
    # Meta tensors: real shapes and dtypes without allocating or initialising 16.7M parameters.
    with torch.device("meta"):
        model = RRDBNet(**spec["constructor_kwargs"])
    assert_matches_manifest(model, spec)
    assert spec["num_parameters"] == 16_697_987


def test_rrdbnet_constructor_signature_is_official() -> None:
    params = inspect.signature(RRDBNet).parameters
    assert list(params) == ["num_in_ch", "num_out_ch", "scale", "num_feat", "num_block", "num_grow_ch"]
    assert {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty} == \
        dict(scale=4, num_feat=64, num_block=23, num_grow_ch=32)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    with pytest.raises(TypeError):
        RRDBNet(3, 3, upscale=4)  # type: ignore[call-arg]


# --- official outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
def test_rrdbnet_public_outputs(public_rrdbnet: RRDBNet, accelerated: bool) -> None:
    inputs = load_pt(reference_path(*PUBLIC, "inputs.pt"))
    outputs = load_pt(reference_path(*PUBLIC, "outputs.pt"))
    assert set(inputs) == set(outputs)
    model = accelerate(copy.deepcopy(public_rrdbnet)) if accelerated else public_rrdbnet
    with torch.inference_mode():
        for name, x in inputs.items():
            out = model(x)
            assert out.shape == outputs[name].shape, name
            assert torch.allclose(out, outputs[name], atol=PORT_ATOL, rtol=0), \
                f"{name}: max |diff| {(out - outputs[name]).abs().max().item():.3g}"


def test_rrdbnet_public_intermediates(public_rrdbnet: RRDBNet) -> None:
    assert_intermediates_match(public_rrdbnet, reference_path(*PUBLIC), PORT_ATOL)


# --- scale 2 / 1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, factor", [(2, 2), (1, 4)])
def test_scale_unshuffles_input_first(scale: int, factor: int) -> None:
    model = _randomise_rrdbnet(RRDBNet(**{**TINY, "scale": scale}))
    assert model.conv_first.in_channels == 3 * factor ** 2
    # The same weights as an x4 net on explicitly unshuffled input: the only difference is that first step.
    trunk = RRDBNet(**{**TINY, "num_in_ch": 3 * factor ** 2, "scale": 4}).eval()
    trunk.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 4 * 3, 4 * 5)
    with torch.inference_mode():
        out = model(x)
        assert out.shape == (2, 3, 12 * scale, 20 * scale)
        assert torch.allclose(out, trunk(_unshuffle_by_reshape(x, factor)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [3, 8, 0])
def test_unsupported_scale_is_refused(scale: int) -> None:
    with pytest.raises(ValueError, match="scale"):
        RRDBNet(**{**TINY, "scale": scale})


# --- strictness ------------------------------------------------------------------------------------------


def test_rrdbnet_strict_load_rejects_missing_and_unexpected_keys() -> None:
    state = RRDBNet(**TINY).state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        RRDBNet(**TINY).load_state_dict({k: v for k, v in state.items() if k != "conv_hr.bias"}, strict=True)
    # The original ESRGAN names must be mapped before loading, not silently accepted.
    legacy = {k.replace("conv_body", "trunk_conv"): v for k, v in state.items()}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        RRDBNet(**TINY).load_state_dict(legacy, strict=True)


def test_forward_leaves_input_and_trunk_alone_and_trains() -> None:
    """In-place activations must touch only fresh tensors: input intact, autograd still valid."""
    model = _randomise_rrdbnet(RRDBNet(**TINY)).train()
    x = torch.rand(1, 3, 6, 7)
    before = x.clone()
    model(x).square().mean().backward()
    assert torch.equal(x, before)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dense_block_init_is_scaled_down() -> None:
    """BasicSR starts each dense-block conv at 0.1 x Kaiming with zero bias, so blocks begin near identity."""
    torch.manual_seed(0)
    model = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=32, num_block=1, num_grow_ch=16)
    conv = model.body[0].rdb1.conv5
    fan_in = conv.weight[0].numel()
    assert torch.count_nonzero(conv.bias) == 0
    assert conv.weight.std().item() == pytest.approx(0.1 * (2.0 / fan_in) ** 0.5, rel=0.1)
