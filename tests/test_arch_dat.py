"""DAT conformance: official state_dict layout, official outputs, strictness, and the padding / shift-mask paths."""
from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from torch import nn

from srmodels.models.accelerate import accelerate
from srmodels.archs._layers import shift_window_mask, window_token_order
from srmodels.archs.dat import DAT

from .helpers import (PORT_ATOL, REFERENCE, assert_intermediates_match, assert_matches_manifest, load_pt,
                     manifest, public_model, reference_path)

PUBLIC = ("fixtures", "dat", "public")
MANIFESTS = sorted(p.name for p in (REFERENCE / "fixtures" / "dat").glob("manifest_full*.json")) or ["(none)"]
PUBLIC_INPUTS = (sorted(load_pt(REFERENCE.joinpath(*PUBLIC, "inputs.pt")))
                 if REFERENCE.joinpath(*PUBLIC, "inputs.pt").exists() else ["(none)"])

# Small enough for fast self-consistency checks; the spatial block of group 1 is shifted (b_idx 0 of an odd group).
TINY = dict(upscale=2, in_chans=3, img_size=16, img_range=1.0, split_size=[2, 8], depth=[2, 2], embed_dim=32,
            num_heads=[4, 4], expansion_factor=2.0, resi_connection="1conv")


def _randomise_dat(model: nn.Module, seed: int = 0) -> nn.Module:
    """O(1) random weights and BatchNorm statistics, so that ordering or mask mistakes move the output visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 if p.ndim > 1
                    else 1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def public_dat() -> DAT:
    return public_model("dat", DAT)


@pytest.fixture(scope="module")
def tiny_model() -> DAT:
    torch.manual_seed(0)
    return _randomise_dat(DAT(**TINY))


# --- structure -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest_name", MANIFESTS)
def test_dat_state_dict_matches_manifest(manifest_name: str) -> None:
    spec = manifest("dat", manifest_name)
    # Meta tensors: real shapes and dtypes without allocating (or initialising) the 15M-parameter model.
    with torch.device("meta"):
        model = DAT(**spec["constructor_kwargs"])
    assert_matches_manifest(model, spec)


def test_dat_constructor_signature_is_official() -> None:
    params = inspect.signature(DAT).parameters
    assert {k: p.default for k, p in params.items()} == dict(
        img_size=64, in_chans=3, embed_dim=180, split_size=[2, 4], depth=[2, 2, 2, 2], num_heads=[2, 2, 2, 2],
        expansion_factor=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1,
        act_layer=nn.GELU, norm_layer=nn.LayerNorm, use_chk=False, upscale=2, img_range=1.0,
        resi_connection="1conv", upsampler="pixelshuffle")
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    with pytest.raises(TypeError):
        DAT(depths=[2, 2])  # type: ignore[call-arg]


def test_variants_build() -> None:
    with torch.device("meta"):
        light = DAT(**{**TINY, "upsampler": "pixelshuffledirect", "resi_connection": "3conv"})
        x3 = DAT(**{**TINY, "upscale": 3})
    assert [type(m).__name__ for m in light.upsample] == ["Conv2d", "PixelShuffle"]
    assert not hasattr(light, "conv_before_upsample") and not hasattr(light, "conv_last")
    assert light.upsample[0].out_channels == 3 * 2 ** 2
    assert isinstance(light.conv_after_body, nn.Sequential) and len(light.conv_after_body) == 5
    assert x3.upsample[0].out_channels == 9 * 64
    with pytest.raises(ValueError):
        DAT(**{**TINY, "resi_connection": "2conv"})
    with pytest.raises(ValueError):
        DAT(**{**TINY, "upsampler": "nearest+conv"})


# --- official outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
@pytest.mark.parametrize("name", PUBLIC_INPUTS)
def test_dat_public_outputs(public_dat: DAT, name: str, accelerated: bool) -> None:
    inputs = load_pt(reference_path(*PUBLIC, "inputs.pt"))
    outputs = load_pt(reference_path(*PUBLIC, "outputs.pt"))
    assert set(inputs) == set(outputs)
    model = accelerate(copy.deepcopy(public_dat)) if accelerated else public_dat
    with torch.inference_mode():
        out = model(inputs[name])
    assert out.shape == outputs[name].shape
    assert torch.allclose(out, outputs[name], atol=PORT_ATOL, rtol=0), \
        f"{name}: max |diff| {(out - outputs[name]).abs().max().item():.3g}"


def test_dat_public_intermediates(public_dat: DAT) -> None:
    assert_intermediates_match(public_dat, reference_path(*PUBLIC), PORT_ATOL)


def test_public_grad_mode_matches(public_dat: DAT) -> None:
    """The autograd path (no in-place shortcuts lost) gives the accelerated inference result, and gradients."""
    debug = [x for name, x in load_pt(reference_path(*PUBLIC, "inputs.pt")).items() if name.startswith("debug_")]
    x = debug[0].clone().requires_grad_(True)
    out = public_dat(x)
    with torch.inference_mode():
        ref = accelerate(copy.deepcopy(public_dat))(x.detach())
    # Accelerated inference runs the wide 3x3 convs by Winograd, autograd by direct convolution: rounding apart.
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-6)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- strictness ------------------------------------------------------------------------------------------


def test_strict_load_rejects_wrong_keys(public_dat: DAT) -> None:
    state = load_pt(reference_path(*PUBLIC, "state_dict.pt"))
    model = DAT(**json.loads(reference_path(*PUBLIC, "config.json").read_text()))

    renamed = dict(state)
    renamed["layers.0.blocks.0.attn.qkv.weightx"] = renamed.pop("layers.0.blocks.0.attn.qkv.weight")
    with pytest.raises(RuntimeError, match="qkv.weight"):
        model.load_state_dict(renamed, strict=True)

    missing = {k: v for k, v in state.items() if not k.endswith("attn_mask_0")}
    with pytest.raises(RuntimeError, match="attn_mask_0"):
        model.load_state_dict(missing, strict=True)

    extra = {**state, "layers.0.blocks.0.attn.attn_mask_0": torch.zeros(1)}  # a non-shifted block has no mask
    with pytest.raises(RuntimeError, match="Unexpected"):
        model.load_state_dict(extra, strict=True)

    reshaped = {**state, "conv_first.weight": state["conv_first.weight"][:, :, :2]}
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(reshaped, strict=True)


# --- semantics beyond the fixture ------------------------------------------------------------------------


def test_registered_mask_used_only_at_img_size(tiny_model: DAT) -> None:
    """The registered masks are read when the padded size equals img_size, and only then."""
    at_size = torch.rand(1, 3, 16, 16)   # padded 16x16 == img_size
    padded_to = torch.rand(1, 3, 13, 9)  # padded 16x16 too: the same masks apply
    other = torch.rand(1, 3, 8, 24)      # padded 8x24: masks computed for that size
    attn = tiny_model.layers[1].blocks[0].attn
    assert attn.attn_mask_0 is not None
    with torch.inference_mode():
        before = [tiny_model(x) for x in (at_size, padded_to, other)]
        saved = attn.attn_mask_0.clone()
        attn.attn_mask_0.zero_()
        try:
            after = [tiny_model(x) for x in (at_size, padded_to, other)]
        finally:
            attn.attn_mask_0.copy_(saved)
    assert (after[0] - before[0]).abs().max() > 1e-3
    assert (after[1] - before[1]).abs().max() > 1e-3
    assert torch.equal(after[2], before[2])


def test_registered_masks_equal_computed(tiny_model: DAT) -> None:
    attn = tiny_model.layers[1].blocks[0].attn
    mask_0, mask_1 = attn.calculate_mask(16, 16)
    assert torch.equal(attn.attn_mask_0, mask_0) and torch.equal(attn.attn_mask_1, mask_1)
    assert set(mask_0.unique().tolist()) == {-100.0, 0.0}


def test_shift_window_mask_regions() -> None:
    # 8x8 map, 4x4 windows shifted by 2: the last window row/column mixes wrapped-around regions.
    mask = shift_window_mask((8, 8), (4, 4), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()                            # top-left window: one region
    assert (mask[3] == -100).sum() == 16 * 16 - 4 * 4 * 4  # bottom-right window: four regions of 4 tokens
    assert torch.equal(mask, mask.transpose(1, 2))


def test_window_token_order_pads_and_rolls() -> None:
    # 3x5 map padded to 4x6, 2x3 windows, rolled by (1, 1): slot 0 holds token (1, 1).
    order = window_token_order((3, 5), (4, 6), (2, 3), (1, 1))
    assert order.shape == (24,)
    assert order[0].item() == 1 * 5 + 1
    assert (order == -1).sum() == 24 - 15
    assert sorted(order[order >= 0].tolist()) == list(range(15))


def test_batch_elements_are_independent(tiny_model: DAT) -> None:
    # 13x9 pads to img_size (registered masks), 5x21 pads to 8x24 (masks and windows computed for that size)
    for size in [(13, 9), (5, 21)]:
        x = torch.rand(2, 3, *size)
        with torch.inference_mode():
            batched = tiny_model(x)
            single = torch.cat([tiny_model(x[i:i + 1]) for i in range(2)])
        assert batched.shape == (2, 3, size[0] * 2, size[1] * 2)
        assert torch.allclose(batched, single, atol=1e-5, rtol=0), size


def test_checkpointing_gives_the_same_result(tiny_model: DAT) -> None:
    chk = DAT(**{**TINY, "use_chk": True})
    chk.load_state_dict(tiny_model.state_dict(), strict=True)
    chk.eval()
    x = torch.rand(1, 3, 13, 9, requires_grad=True)
    out = chk(x)
    with torch.inference_mode():
        ref = tiny_model(x.detach())
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
