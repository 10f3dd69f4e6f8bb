"""Shared test fixtures: where the reference pack lives, and a skip when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SRMODELS_REFERENCE", ROOT.parent / "shared" / "reference"))


def reference_path(*parts: str) -> Path:
    """Path inside ../shared/reference, or skip the calling test with a reason naming the folder."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference pack not found: {path} (expected ../shared/reference beside the checkout)")
    return path


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def assert_intermediates_match(model: torch.nn.Module, fixture: Path, atol: float) -> None:
    """Outputs of the official named submodules for the fixture's debug input: says where a departure starts.

    Hooks clone what they capture: upstream applies in-place activations to some outputs right afterwards.
    """
    expected = load_pt(fixture / "intermediates.pt")
    debug = [x for name, x in load_pt(fixture / "inputs.pt").items() if name.startswith("debug_")]
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o.clone()))
               for name in expected]
    try:
        with torch.inference_mode():
            model(debug[0])
    finally:
        for handle in handles:
            handle.remove()
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        assert torch.allclose(got[name], want, atol=atol, rtol=0), \
            f"{name}: max |diff| {(got[name] - want).abs().max().item():.3g}"
