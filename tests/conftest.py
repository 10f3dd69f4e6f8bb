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
