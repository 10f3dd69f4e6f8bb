"""Plain helpers shared by the test modules: paths, the reference pack, architecture manifests, tiny synthetic
training data, a tiny fine-tune, DVC helpers. Import them (``from .helpers import ...``); fixtures and hooks live
in conftest.py, which no test imports.

(Child processes that the tests start import this module as ``tests.helpers``, with the checkout on sys.path.)
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from srmodels.core.layout import SCALE
from srmodels.data.images import write_image

__all__ = ["ROOT", "REFERENCE", "SCALE", "DVC", "BACKBONE_STAGES", "PORT_ATOL", "reference_path", "load_pt",
           "public_model", "assert_intermediates_match", "manifest", "assert_matches_manifest", "smooth_image",
           "downscale", "write_split", "write_sr_data", "FINETUNE_CONFIG", "resume_file", "run_finetune",
           "huge_png", "seeded_rand", "refuse_model_load", "minimal_params", "ran_stages", "stale_stages"]

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SRMODELS_REFERENCE", ROOT.parent / "shared" / "reference"))
# The venv's dvc (the one this interpreter's packages run), else the first on PATH.
DVC = (str(Path(sys.executable).with_name("dvc")) if Path(sys.executable).with_name("dvc").exists()
       else shutil.which("dvc") or "dvc")
# Stage-name prefixes of a backbone's own stages in dvc.yaml (foreach over backbones).
BACKBONE_STAGES = ("finetune@", "cache@")


# --- the reference pack (../shared/reference) --------------------------------------------------------------------


def reference_path(*parts: str) -> Path:
    """Path inside ../shared/reference, or skip the calling test with a reason naming the folder."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference pack not found: {path} (expected ../shared/reference beside the checkout)")
    return path


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- architecture ports against the official code (tests/test_arch_*.py, tests/test_accelerate.py) --------------

# Our ports against the official modules on the public fixtures, float32, max |difference|.
PORT_ATOL = 5e-5


def public_model(arch: str, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """``cls`` built from ``fixtures/<arch>/public/config.json`` holding that fixture's weights, in eval mode."""
    model = cls(**json.loads(reference_path("fixtures", arch, "public", "config.json").read_text()))
    model.load_state_dict(load_pt(reference_path("fixtures", arch, "public", "state_dict.pt")), strict=True)
    return model.eval()


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


# --- training data (test_datasets, test_train, test_ema, test_fusion, test_ddp, test_extending) --------------------
# Tiny synthetic images that a few training steps can learn from.


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


def write_sr_data(root: Path) -> dict:
    """The fine-tuning data of test_train and test_ema (and of test_ema's recorded probe, bit for bit): eight
    80x80 training patches and two 64x64 validation images. ``{'train': (hr, lr), 'val': [(hr, lr) pairs]}``."""
    from srmodels.data.datasets import list_pairs

    rng = np.random.default_rng(0)
    train = write_split(root / "train", {f"t{i}_s001": smooth_image(rng, 80, 80) for i in range(8)})
    val_hr, val_lr = write_split(root / "val", {f"v{i}": smooth_image(rng, 64, 64) for i in range(2)})
    return {"train": train, "val": list_pairs(val_hr, val_lr, SCALE)}


# --- a tiny fine-tune of rfdn_tiny (test_train, test_ema) ----------------------------------------------------------


def _finetune_config():
    from srmodels.training.finetune import BETAS
    from srmodels.training.loop import TrainConfig

    # One intra-op thread: these tensors are tiny, so more threads only add synchronisation (badly so on a busy CPU).
    return TrainConfig(epochs=2, batch=4, lr=1e-3, crop_border=4, seed=0, betas=BETAS, threads=1)


FINETUNE_CONFIG = _finetune_config()


def resume_file(out_dir: Path) -> Path:
    """Where :func:`run_finetune` keeps the resume state of ``out_dir`` (beside it, as the stage does)."""
    return out_dir.with_name(out_dir.name + ".resume.pth")


def run_finetune(sr_data: dict, out_dir: Path, log_metrics=None, resume: bool = True,
                 **settings) -> tuple[dict, torch.nn.Module]:
    """A tiny fine-tune of a freshly seeded rfdn_tiny (``FINETUNE_CONFIG`` with ``settings``) on ``sr_data``
    (:func:`write_sr_data`); its resume state lives in :func:`resume_file` unless ``resume`` is False."""
    from srmodels.data.datasets import PairedPatches
    from srmodels.models.model import build_model
    from srmodels.training.finetune import finetune

    torch.manual_seed(0)
    model = build_model("rfdn_tiny")
    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    metrics = finetune(model, train, sr_data["val"], replace(FINETUNE_CONFIG, **settings), out_dir,
                       provenance={"test": True}, resume_path=resume_file(out_dir) if resume else None,
                       log_metrics=log_metrics)
    return metrics, model


# --- inputs -------------------------------------------------------------------------------------------------------


def huge_png(path: Path, width: int = 40000, height: int = 40000) -> Path:
    """A PNG whose valid header declares more pixels than OpenCV's 2^30 limit; the data is a token."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def seeded_rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """``torch.rand(shape)`` from its own generator seeded with ``seed`` (the global RNG untouched)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def refuse_model_load(monkeypatch) -> None:
    """Fail the test if a CLI command gets as far as loading a model: arguments and inputs must be checked first."""
    def refuse(*_, **__):
        raise AssertionError("the model was loaded before the arguments and inputs were checked")
    monkeypatch.setattr("srmodels.cli.load_model", refuse)


# --- DVC ----------------------------------------------------------------------------------------------------------


def minimal_params() -> dict:
    """The committed params.yaml on a minimal profile: a few small sample images, one epoch, small batches and
    patches, one intra-op thread (test_pipeline_e2e, test_extending)."""
    import yaml

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"]["samples"] = {"backbone_train": ["camera", "brick"], "fusion_train": ["grass", "gravel"],
                            "val": ["coins"], "test": ["clock"]}
    p["data"]["patches"] = {"hr_size": 96, "step": 96}
    # One intra-op thread: on a 2-vCPU Intel Xeon, 2 threads give other bits in about 1 process in 8
    # (docs/reproducibility.md), and these tests compare outputs of separate processes bit for bit.
    p["threads"] = 1
    # Through the defaults: the backbones' entries stay as committed, so README's `-S` lines meet them as users do.
    p["backbone_defaults"].update(epochs=1, batch=4, lr_patch=16)
    p["fusion"].update(epochs=1, batch=4, lr_patch=16, crops_per_image=2)
    return p


def copy_checkout(dst: Path, *, outputs: bool = True) -> Path:
    """The files of this checkout that git tracks or would track (untracked, not ignored), copied into ``dst``.
    ``outputs=False`` leaves out the committed pipeline outputs and dvc.lock: a repository that never ran."""
    from . import procs

    listed = procs.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       timeout=60, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if not outputs and ((rel.startswith("data/") and not rel.endswith(".gitignore")) or rel == "dvc.lock"):
            continue
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def ran_stages(out: str) -> set[str]:
    """The stages a ``dvc repro`` output says it ran."""
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def stale_stages(repo: Path, env: dict[str, str] | None = None, timeout: float = 120) -> set[str]:
    """The stages ``dvc status`` says would run in ``repo``."""
    from . import procs

    done = procs.run([DVC, "status", "--json"], cwd=repo, env=env, timeout=timeout, check=True,
                     what=f"dvc status in {repo}")
    return set(json.loads(done.stdout or "{}"))
