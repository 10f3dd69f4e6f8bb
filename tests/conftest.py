"""Shared test fixtures: where the reference pack lives, and a skip when it is absent."""
from __future__ import annotations

import json
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


# --- architecture manifests (tests/test_arch_*.py, tests/test_accelerate.py) ----------------------------------


def manifest(arch: str, name: str = "manifest_full.json") -> dict:
    """A reference manifest (``fixtures/<arch>/<name>``), or skip."""
    return json.loads(reference_path("fixtures", arch, name).read_text())


def assert_matches_manifest(model: torch.nn.Module, spec: dict) -> None:
    """``model``'s state_dict is the released one: key order, shapes, dtypes, parameter vs buffer, parameter count,
    the buffers registered as None, and the plain tensor attributes that checkpoints do not carry."""
    state = model.state_dict()
    params = dict(model.named_parameters())
    rows = spec["state_dict"]
    assert list(state) == [row[0] for row in rows]
    for key, shape, dtype, kind in rows:
        assert list(state[key].shape) == shape, key
        assert str(state[key].dtype) == f"torch.{dtype}", key
        assert (key in params) == (kind == "parameter"), key
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    modules = dict(model.named_modules())
    for key in spec.get("buffers_registered_as_None_absent_from_state_dict", []):
        owner, _, name = key.rpartition(".")
        assert key not in state
        assert name in modules[owner]._buffers and modules[owner]._buffers[name] is None, key
    for name, attr in spec.get("plain_tensor_attributes_not_in_state_dict", {}).items():
        value = getattr(model, name)
        assert isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
        assert name not in state and name not in dict(model.named_buffers())
        assert list(value.shape) == attr["shape"] and str(value.dtype) == f"torch.{attr['dtype']}"
        assert torch.allclose(value.cpu(), torch.tensor(attr["values"]).view(attr["shape"]))


# --- training data (tests/test_datasets.py, test_train.py, test_fusion.py, test_ddp.py) ------------------------
# Plain functions: tiny synthetic images that a few training steps can learn from. (Imported here, not at the
# top, to keep this section apart from the others.)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from srmodels.data.images import write_image  # noqa: E402
from srmodels.core.layout import SCALE  # noqa: E402


def smooth_image(rng: np.random.Generator, h: int, w: int, lo: int = 0, hi: int = 255) -> np.ndarray:
    """A learnable texture: random coarse grid, bicubically enlarged (uint8 HxWx3 in [lo, hi])."""
    coarse = rng.uniform(lo, hi, size=(max(h // 8, 2), max(w // 8, 2), 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), lo, hi).round().astype(np.uint8)


def downscale(hr: np.ndarray) -> np.ndarray:
    """The x4 LR of an HR image (area averaging)."""
    return cv2.resize(hr, (hr.shape[1] // SCALE, hr.shape[0] // SCALE), interpolation=cv2.INTER_AREA)


def write_split(root: Path, images: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """``root/hr`` and ``root/lr`` holding each HR image and its LR, as PNGs named by stem; returns (hr, lr)."""
    for stem, hr in images.items():
        write_image(root / "hr" / f"{stem}.png", hr)
        write_image(root / "lr" / f"{stem}.png", downscale(hr))
    return root / "hr", root / "lr"


@pytest.fixture
def cli(capsys, monkeypatch):
    """``srmodels`` main() in-process: (exit code, stdout, stderr); SRMODELS_DEBUG unset so errors are one line."""
    from srmodels.cli import main

    monkeypatch.delenv("SRMODELS_DEBUG", raising=False)

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """An empty folder in which no file can be made: mode 0o555. Root passes the permission bits, so when this
    process could still write there, making a file in it (``os.open`` with O_CREAT, what ``tempfile`` calls) is
    refused with EACCES, as the kernel refuses it to anyone else, or to root on a read-only mount."""
    import errno

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and Path(os.path.abspath(path)).is_relative_to(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    yield folder
    folder.chmod(0o755)
