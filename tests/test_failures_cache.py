"""Cached backbone outputs that are missing, cut or stale: one DataError naming the file and the stage to re-run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from srmodels.data.member_outputs import check_output, load_output, rerun_hint, save_output
from srmodels.core.errors import DataError
from srmodels.evaluation.evaluation import fuse_eval_sets, load_member_outputs, score_eval_sets
from srmodels.data.images import write_image


def _save(path: Path, h: int = 16, w: int = 24, value: float = 0.5) -> bytes:
    save_output(path, torch.full((1, 3, h, w), value))
    return path.read_bytes()


@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_npy_names_file_sizes_and_stage(tmp_path, mmap):
    path = tmp_path / "cache" / "dat" / "eval_se" / "test" / "chelsea.npy"
    blob = _save(path)
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as err:
        load_output(path, mmap=mmap)
    msg = str(err.value)
    assert msg.startswith(f"{path}: truncated cached SR output ({len(blob) // 2:,} bytes, expected {len(blob):,}")
    assert msg.endswith("dvc repro -f cache@dat") and "\n" not in msg


@pytest.mark.parametrize("content, says", [
    (lambda blob: blob[:40], "truncated cached SR output (40 bytes, cut inside the .npy header)"),
    (lambda blob: b"", "truncated cached SR output (0 bytes"),
    (lambda blob: b"not an array at all", "not a readable .npy file"),
])
def test_damaged_header(tmp_path, content, says):
    path = tmp_path / "rfdn" / "val" / "clock.npy"
    path.write_bytes(content(_save(path)))
    with pytest.raises(DataError, match=f"clock.npy: {says}".replace("(", r"\(").replace(")", r"\)")):
        load_output(path, mmap=True)


def test_missing_and_misshaped(tmp_path):
    with pytest.raises(DataError, match=r"swinir/fusion_train/x\.npy: cached SR output missing; .*cache@swinir"):
        load_output(tmp_path / "swinir" / "fusion_train" / "x.npy")
    np.save(tmp_path / "flat.npy", np.zeros((5, 5), np.float16))
    with pytest.raises(DataError, match=r"shape \(5, 5\), expected \(3, H, W\)"):
        load_output(tmp_path / "flat.npy")


def test_whole_file_round_trip_and_no_temporary_left(tmp_path):
    path = tmp_path / "dat" / "val" / "coins.npy"
    _save(path, value=0.25)
    assert check_output(path) == (3, 16, 24)
    arr = load_output(path, mmap=True)
    assert arr.dtype == np.float16 and float(arr[0, 0, 0]) == 0.25
    assert sorted(p.name for p in path.parent.iterdir()) == ["coins.npy"]


def test_rerun_hint_reads_the_member_off_the_path():
    assert rerun_hint(Path("data/cache/rfdn/eval/Set5/bird.npy")).endswith("dvc repro -f cache@rfdn")
    assert rerun_hint(Path("data/cache/dat/val_se/coins.npy")).endswith("dvc repro -f cache@dat")
    assert rerun_hint(Path("elsewhere/x.npy")).endswith("cache@<member>")


def _scored_set(tmp_path: Path, members=("dat", "rfdn")) -> tuple[Path, Path]:
    """prepared/eval/test with one 8x6 LR (and 32x24 HR) image, and a whole cache for each member."""
    prepared, cache = tmp_path / "prepared", tmp_path / "cache"
    rng = np.random.default_rng(0)
    write_image(prepared / "eval" / "test" / "lr" / "moon.png", rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    write_image(prepared / "eval" / "test" / "hr" / "moon.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    for m in members:
        for sub in ("eval", "eval_se"):
            _save(cache / m / sub / "test" / "moon.npy", 24, 32)
    return prepared, cache


def test_fusion_test_step_checks_the_cache_before_clearing_its_output(tmp_path):
    prepared, cache = _scored_set(tmp_path)
    bad = cache / "rfdn" / "eval_se" / "test" / "moon.npy"
    bad.write_bytes(bad.read_bytes()[:-10])
    out = tmp_path / "test_out"
    (out / "sr").mkdir(parents=True)
    (out / "sr" / "previous.png").write_bytes(b"kept")

    def never(*_):
        raise AssertionError("the net ran before the cache was checked")

    with pytest.raises(DataError, match=r"rfdn/eval_se/test/moon\.npy: truncated .*cache@rfdn"):
        fuse_eval_sets(never, "pixel", ["dat", "rfdn"], cache, prepared, out, self_ensemble=True,
                       device=torch.device("cpu"))
    assert (out / "sr" / "previous.png").read_bytes() == b"kept"


def test_members_of_different_sizes_are_named(tmp_path):
    prepared, cache = _scored_set(tmp_path)
    _save(cache / "rfdn" / "eval" / "test" / "moon.npy", 24, 28)
    dirs = [cache / m / "eval" / "test" for m in ("dat", "rfdn")]
    with pytest.raises(DataError, match=r"rfdn/eval/test/moon\.npy: cached output of shape \(3, 24, 28\) does "
                                        r"not match \(3, 24, 32\)"):
        load_member_outputs(dirs, "moon")


def test_score_step_names_missing_and_stale_inputs(tmp_path):
    prepared, cache = _scored_set(tmp_path)
    test_dir = tmp_path / "test_out"
    kwargs = dict(scale=4, crop_border=4, self_ensemble=True)
    with pytest.raises(DataError, match=r"sr/test/moon\.png: fused image missing; re-run the test stage"):
        score_eval_sets(["dat", "rfdn"], cache, prepared, test_dir, **kwargs)
    write_image(test_dir / "sr" / "test" / "moon.png", np.zeros((24, 32, 3), np.uint8))
    summary, _, _ = score_eval_sets(["dat", "rfdn"], cache, prepared, test_dir, **kwargs)
    assert set(summary["test"]) == {"bicubic", "dat", "dat+se", "rfdn", "rfdn+se", "fusion", "num_images"}
    _save(cache / "dat" / "eval_se" / "test" / "moon.npy", 20, 32)  # from another run's images
    with pytest.raises(DataError, match=r"dat/eval_se/test/moon\.npy: dat\+se output is 32x20, but HR"):
        score_eval_sets(["dat", "rfdn"], cache, prepared, test_dir, **kwargs)
    (cache / "rfdn" / "eval" / "test" / "moon.npy").unlink()
    with pytest.raises(DataError, match=r"rfdn/eval/test/moon\.npy: cached SR output missing"):
        score_eval_sets(["dat", "rfdn"], cache, prepared, test_dir, **kwargs)
