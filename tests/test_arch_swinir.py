"""SwinIR conformance: official state_dict layout, official outputs, and the shift-mask / padding paths."""
from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srmodels.models.accelerate import accelerate
from srmodels.archs._layers import shift_window_mask
from srmodels.archs.swinir import SwinIR, window_partition, window_reverse

from .helpers import (PORT_ATOL, REFERENCE, assert_intermediates_match, assert_matches_manifest, load_pt,
                     manifest, public_model, reference_path)

PUBLIC = ("fixtures", "swinir", "public")
MANIFESTS = sorted(p.name for p in (REFERENCE / "fixtures" / "swinir").glob("manifest_full*.json")) or ["(none)"]
PIPELINE_SUFFIX = "__main_test_swinir_pipeline"

# Same architecture family as the public fixture, small enough for fast self-consistency checks.
TINY = dict(upscale=4, in_chans=3, img_size=16, window_size=8, img_range=1.0, depths=[3, 2], embed_dim=24,
            num_heads=[2, 3], mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv")


def _randomise_swinir(model: nn.Module, seed: int = 0) -> nn.Module:
    """O(1) random weights so that ordering or mask mistakes move the output visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 1.0 / max(1, p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def public_swinir() -> SwinIR:
    return public_model("swinir", SwinIR)


# --- structure -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest_name", MANIFESTS)
def test_swinir_state_dict_matches_manifest(manifest_name: str) -> None:
    spec = manifest("swinir", manifest_name)
    # Meta tensors: real shapes and dtypes without allocating the 12M-parameter model.
    with torch.device("meta"):
        model = SwinIR(**spec["constructor_kwargs"])
    assert_matches_manifest(model, spec)


def test_constructed_buffers_equal_official(public_swinir: SwinIR) -> None:
    """relative_position_index and attn_mask are constructed, not trained: ours must equal upstream's."""
    reference = load_pt(reference_path(*PUBLIC, "state_dict.pt"))
    fresh = SwinIR(**json.loads(reference_path(*PUBLIC, "config.json").read_text())).state_dict()
    buffers = [k for k in reference if k.endswith(("relative_position_index", "attn_mask"))]
    assert buffers
    for key in buffers:
        assert fresh[key].dtype == reference[key].dtype
        assert torch.equal(fresh[key], reference[key]), key
    masks = [k for k in buffers if k.endswith("attn_mask")]
    assert masks and all(set(torch.unique(reference[k]).tolist()) == {-100.0, 0.0} for k in masks)


def test_constructor_signature() -> None:
    params = inspect.signature(SwinIR).parameters
    expected = dict(img_size=64, patch_size=1, in_chans=3, embed_dim=96, depths=[6, 6, 6, 6],
                    num_heads=[6, 6, 6, 6], window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                    drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False,
                    patch_norm=True, use_checkpoint=False, upscale=2, img_range=1.0, upsampler="",
                    resi_connection="1conv")
    assert {k: p.default for k, p in params.items()} == expected
    with pytest.raises(TypeError):
        SwinIR(depth=[2])  # DAT's keyword: must not be swallowed
    with pytest.raises(ValueError):
        SwinIR(upsampler="pixelshufle")


# --- official outputs ------------------------------------------------------------------------------------


def _input_names() -> list[str]:
    meta = REFERENCE.joinpath(*PUBLIC, "meta.json")
    return list(json.loads(meta.read_text())["inputs"]) if meta.exists() else ["(none)"]


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
@pytest.mark.parametrize("name", _input_names())
def test_swinir_public_outputs(public_swinir: SwinIR, name: str, accelerated: bool) -> None:
    x = load_pt(reference_path(*PUBLIC, "inputs.pt"))[name]
    expected = load_pt(reference_path(*PUBLIC, "outputs.pt"))[name]
    model = accelerate(copy.deepcopy(public_swinir)) if accelerated else public_swinir
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape and out.is_contiguous()
    assert torch.allclose(out, expected, atol=PORT_ATOL, rtol=0), (out - expected).abs().max().item()


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
def test_public_main_test_pipeline(public_swinir: SwinIR, accelerated: bool) -> None:
    """main_test_swinir.py pads by flipped concatenation up to the next window multiple before the model."""
    model = accelerate(copy.deepcopy(public_swinir)) if accelerated else public_swinir
    outputs = load_pt(reference_path(*PUBLIC, "outputs.pt"))
    inputs = load_pt(reference_path(*PUBLIC, "inputs.pt"))
    for key in [k for k in outputs if k.endswith(PIPELINE_SUFFIX)]:
        x = inputs[key[: -len(PIPELINE_SUFFIX)]]
        h, w = x.shape[-2:]
        ws = public_swinir.window_size
        x = torch.cat([x, x.flip(2)], 2)[:, :, : (h // ws + 1) * ws]
        x = torch.cat([x, x.flip(3)], 3)[:, :, :, : (w // ws + 1) * ws]
        with torch.no_grad():
            out = model(x)[..., : h * 4, : w * 4]
        assert torch.allclose(out, outputs[key], atol=PORT_ATOL, rtol=0), key


def test_swinir_public_intermediates(public_swinir: SwinIR) -> None:
    assert_intermediates_match(public_swinir, reference_path(*PUBLIC), PORT_ATOL)


# --- padding and shift-mask paths ------------------------------------------------------------------------


def _reference_layer(layer: nn.Module, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """A BasicLayer computed the textbook way: roll, partition, attend, reverse and roll back in every block."""
    h, w = x_size
    b, _, c = x.shape
    for blk in layer.blocks:
        ws, shift = blk.window_size, blk.shift_size
        y = blk.norm1(x).view(b, h, w, c)
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        mask = blk.calculate_mask((h, w)) if shift else None
        y = blk.attn(window_partition(y, ws).view(-1, ws * ws, c), mask)
        y = window_reverse(y.view(-1, ws, ws, c), ws, h, w)
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
        x = x + y.reshape(b, h * w, c)
        x = x + blk.mlp(blk.norm2(x))
    return x


@pytest.mark.parametrize("size", [(16, 16), (24, 40), (32, 16)])
def test_window_order_matches_roll_and_partition(size: tuple[int, int]) -> None:
    """Blocks work on window-ordered tokens; an odd depth checks the hand-over between orders too."""
    model = _randomise_swinir(SwinIR(**TINY))
    layer = model.layers[0].residual_group
    x = torch.randn(2, size[0] * size[1], TINY["embed_dim"])
    with torch.no_grad():
        assert torch.allclose(layer(x, size), _reference_layer(layer, x, size), atol=1e-5, rtol=0)


def test_registered_mask_equals_computed_mask() -> None:
    model = SwinIR(**TINY)
    blk = model.layers[0].residual_group.blocks[1]
    assert blk.shift_size == 4 and blk.attn_mask.shape == (4, 64, 64)
    assert torch.equal(blk.attn_mask, shift_window_mask((16, 16), (8, 8), (4, 4)))
    assert set(torch.unique(blk.attn_mask).tolist()) == {-100.0, 0.0}
    assert not shift_window_mask((24, 16), (8, 8), (0, 0)).any()


def _transplant(src: SwinIR, **overrides) -> SwinIR:
    """Same weights in a model built for another img_size (its own attn_mask buffers)."""
    dst = SwinIR(**{**TINY, **overrides})
    weights = {k: v for k, v in src.state_dict().items() if not k.endswith("attn_mask")}
    missing, unexpected = dst.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("attn_mask") for k in missing)
    return dst.eval()


def test_registered_and_computed_mask_paths_agree() -> None:
    """A padded size equal to img_size uses the buffers; any other size computes masks. Both must agree."""
    model = _randomise_swinir(SwinIR(**TINY))
    wide = _transplant(model, img_size=(16, 24))  # registered masks for 16 x 24
    other = _transplant(model, img_size=32)  # never matches: always computed
    g = torch.Generator().manual_seed(1)
    square = torch.rand(1, 3, 16, 16, generator=g)
    odd = torch.rand(1, 3, 13, 19, generator=g)  # reflect-padded to 16 x 24, != img_size 16
    with torch.no_grad():
        assert torch.allclose(model(square), other(square), atol=PORT_ATOL, rtol=0)
        out = model(odd)
        assert out.shape == (1, 3, 52, 76)
        assert torch.allclose(out, wide(odd), atol=PORT_ATOL, rtol=0)
        assert torch.allclose(out, other(odd), atol=PORT_ATOL, rtol=0)
        # Padding happens before normalisation and is cropped away: same as padding by hand.
        padded = F.pad(odd, (0, 5, 0, 3), mode="reflect")
        assert torch.allclose(out, model(padded)[..., :52, :76], atol=PORT_ATOL, rtol=0)
        # The shift mask matters: dropping it must change the output.
        for blk in model.layers[0].residual_group.blocks[1::2]:
            blk.attn_mask.zero_()
        assert not torch.allclose(model(square), other(square), atol=1e-3, rtol=0)


def test_batch_is_independent() -> None:
    model = _randomise_swinir(SwinIR(**TINY))
    x = torch.rand(3, 3, 11, 17, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=PORT_ATOL, rtol=0)


def test_too_small_input_is_refused() -> None:
    model = SwinIR(**TINY).eval()
    with pytest.raises(RuntimeError, match="Padding size should be less than the corresponding input dimension"):
        model(torch.rand(1, 3, 4, 9))  # reflect padding by 4 needs at least 5 rows


# --- strictness ------------------------------------------------------------------------------------------


def test_strict_loading(public_swinir: SwinIR) -> None:
    config = json.loads(reference_path(*PUBLIC, "config.json").read_text())
    state = public_swinir.state_dict()
    mask_key = next(k for k in state if k.endswith("attn_mask"))
    with pytest.raises(RuntimeError, match="Missing key"):
        SwinIR(**config).load_state_dict({k: v for k, v in state.items() if k != mask_key}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        SwinIR(**config).load_state_dict({**state, "layers.0.residual_group.blocks.0.attn_mask": state[mask_key]})
    with pytest.raises(RuntimeError, match="size mismatch"):
        SwinIR(**{**config, "img_size": 24}).load_state_dict(state, strict=True)


# --- other heads and training ----------------------------------------------------------------------------


# The official SwinIR's modules after the body for each head (their state_dict names, weight and bias each).
_HEADS = {"pixelshuffledirect": ["upsample.0"],
          "nearest+conv": ["conv_before_upsample.0", "conv_up1", "conv_up2", "conv_hr", "conv_last"],
          "": ["conv_last"],
          "pixelshuffle": ["conv_before_upsample.0", "upsample.0", "conv_last"]}
_RESI = {"1conv": ["conv_after_body"], "3conv": ["conv_after_body.0", "conv_after_body.2", "conv_after_body.4"]}


@pytest.mark.parametrize("upsampler, upscale, resi", [("pixelshuffledirect", 3, "3conv"), ("nearest+conv", 4, "1conv"),
                                                      ("", 1, "1conv"), ("pixelshuffle", 2, "3conv")])
def test_other_heads_shapes(upsampler: str, upscale: int, resi: str) -> None:
    """Each head and residual connection has the official modules (so released weights of that kind load) and
    gives the x``upscale`` output."""
    model = SwinIR(**{**TINY, "upsampler": upsampler, "upscale": upscale, "resi_connection": resi}).eval()
    after_body = [k.rsplit(".", 1)[0] for k in model.state_dict()
                  if k.startswith(("conv_after_body", "conv_before_upsample", "upsample", "conv_up", "conv_hr",
                                   "conv_last"))]
    assert after_body == [m for m in _RESI[resi] + _HEADS[upsampler] for _ in ("weight", "bias")]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 10, 13))
    assert out.shape == (1, 3, 10 * upscale, 13 * upscale)


def test_training_step_with_checkpointing() -> None:
    model = SwinIR(**{**TINY, "use_checkpoint": True, "drop_path_rate": 0.1}).train()
    model(torch.rand(2, 3, 12, 16)).square().mean().backward()
    table = model.layers[1].residual_group.blocks[1].attn.relative_position_bias_table
    assert table.grad is not None and torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0
