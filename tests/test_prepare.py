"""The prepare stage on a miniature DIV2K tree and on a tiny scikit-image split (seconds, CPU)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from srmodels.data.prepare import SAMPLE_LOADERS, extract_patches, mod_crop, patch_positions, prepare
from srmodels.data.images import ImageError, read_image, write_image
from srmodels.data.imresize import downscale_uint8
from srmodels.core.params import ParamsError, load_params

from .helpers import ROOT, SCALE, huge_png

# HR sizes (h, w) of the miniature DIV2K_train: odd sizes exercise the mod-crop, 0005 is too small for a patch.
TRAIN_SIZES = {1: (66, 98), 2: (64, 96), 3: (40, 50), 4: (64, 96), 5: (28, 60), 6: (64, 96)}
TRAIN_WITH_LR = (2, 4)       # these get a released-style LR file; the rest must be made by prepare


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _given_lr(hr: np.ndarray) -> np.ndarray:
    # Deliberately not the bicubic result, so a test can tell a given LR (used verbatim) from a made one.
    return 255 - downscale_uint8(mod_crop(hr, SCALE), SCALE)


@pytest.fixture(scope="module")
def base_data() -> dict:
    return load_params(ROOT / "params.yaml")["data"]


@pytest.fixture
def div2k(tmp_path: Path) -> Path:
    """DIV2K-layout tree: train 0001-0006 (LR for two), valid 0801-0802 (no LR), test LR 0901-0902, notes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "DIV2K"
    for n, (h, w) in TRAIN_SIZES.items():
        hr = _image(rng, h, w)
        write_image(root / "DIV2K_train_HR" / f"{n:04d}.png", hr)
        if n in TRAIN_WITH_LR:
            write_image(root / "DIV2K_train_LR_bicubic" / "X4" / f"{n:04d}x4.png", _given_lr(hr))
    (root / "DIV2K_train_HR" / "readme.txt").write_text("not an image")
    for n in (801, 802):
        write_image(root / "DIV2K_valid_HR" / f"{n:04d}.png", _image(rng, 48, 64))
    for n in (901, 902):
        write_image(root / "DIV2K_test_LR_bicubic" / "X4" / f"{n:04d}x4.png", _image(rng, 12, 16))
    return root


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    """A benchmark folder with HR/ and LR_bicubic/X4/ (bird <-> birdx4)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "Set2"
    for stem, (h, w) in {"bird": (41, 52), "baby": (32, 32)}.items():
        hr = _image(rng, h, w)
        write_image(root / "HR" / f"{stem}.png", hr)
        write_image(root / "LR_bicubic" / "X4" / f"{stem}x4.png", _given_lr(hr))
    return root


def _div2k_data(base: dict, root: Path, **changes) -> dict:
    data = copy.deepcopy(base)
    data["source"] = "div2k"
    data["div2k"].update(root=str(root), backbone_train=[1, 3], fusion_train=[4, 5], val=[6, 6], test="valid")
    data["patches"].update(hr_size=32, step=16)
    data["benchmarks"] = {}
    for key, value in changes.items():
        if key in data["div2k"]:
            data["div2k"][key] = value
        else:
            data[key] = value
    return data


def _stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.iterdir())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- helpers


def test_patch_positions_cover_the_far_edge():
    assert patch_positions(96, 32, 16) == [0, 16, 32, 48, 64]
    assert patch_positions(100, 32, 24) == [0, 24, 48, 68]      # extra position flush with the edge
    assert patch_positions(32, 32, 16) == [0]
    assert patch_positions(20, 32, 16) == []


def test_extract_patches_pairs_matching_crops():
    rng = np.random.default_rng(2)
    hr = _image(rng, 40, 48)
    lr = downscale_uint8(hr, SCALE)
    pairs = list(extract_patches(hr, lr, 32, 16, SCALE))
    assert len(pairs) == 2 * 2                                   # rows at 0, 8; columns at 0, 16
    hr_p, lr_p = pairs[-1]
    np.testing.assert_array_equal(hr_p, hr[8:40, 16:48])
    np.testing.assert_array_equal(lr_p, lr[2:10, 4:12])


# ---------------------------------------------------------------------------------------------------- div2k


def test_div2k_layout_sizes_and_lr(base_data, div2k, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_div2k_data(base_data, div2k), SCALE, out)

    assert manifest == json.loads((out / "splits.json").read_text())
    assert manifest["source"] == "div2k" and manifest["test_set"] == "DIV2K_valid"
    assert manifest["splits"] == {"backbone_train": ["0001", "0002", "0003"], "fusion_train": ["0004", "0005"],
                                  "val": ["0006"], "eval": {"test": ["0801", "0802"]}}
    assert manifest["fusion_train_from"] == "fusion_train"
    # 0001/0002: 64x96 -> 3 x 5 positions; 0003: 40x48 -> 2 x 2.
    assert manifest["patches_per_image"] == {"0001": 15, "0002": 15, "0003": 4}
    assert manifest["num_patches"] == 34
    assert manifest["eval_has_hr"] == {"test": True}

    for split in ("fusion_train", "val", "eval/test"):
        assert _stems(out / split / "hr") == _stems(out / split / "lr")
    assert _stems(out / "fusion_train" / "hr") == ["0004", "0005"]
    assert len(list((out / "train_patches" / "hr").iterdir())) == 34
    assert _stems(out / "train_patches" / "hr") == _stems(out / "train_patches" / "lr")
    assert (out / "train_patches" / "hr" / "0001_s015.png").is_file()

    # HR mod-cropped, LR exactly HR / 4.
    for folder in (out / "fusion_train", out / "val", out / "eval" / "test"):
        for hr_path in (folder / "hr").iterdir():
            hr, lr = read_image(hr_path), read_image(folder / "lr" / hr_path.name)
            assert hr.shape[0] % SCALE == 0 and hr.shape[1] % SCALE == 0
            assert lr.shape == (hr.shape[0] // SCALE, hr.shape[1] // SCALE, 3)
    for p in (out / "train_patches" / "hr").iterdir():
        assert read_image(p).shape == (32, 32, 3)
        assert read_image(out / "train_patches" / "lr" / p.name).shape == (8, 8, 3)

    # Made LR = MATLAB bicubic of the mod-cropped HR; given LR used verbatim.
    src4 = read_image(div2k / "DIV2K_train_HR" / "0004.png")
    src5 = read_image(div2k / "DIV2K_train_HR" / "0005.png")
    np.testing.assert_array_equal(read_image(out / "fusion_train" / "lr" / "0004.png"), _given_lr(src4))
    np.testing.assert_array_equal(read_image(out / "fusion_train" / "hr" / "0005.png"), src5[:28, :60])
    np.testing.assert_array_equal(read_image(out / "fusion_train" / "lr" / "0005.png"),
                                  downscale_uint8(src5, SCALE))
    assert manifest["lr_made"]["fusion_train"] == ["0005"]
    assert manifest["lr_made"]["backbone_train"] == ["0001", "0003"]

    # A patch is the matching crop of the mod-cropped HR and of its LR (last patch of 0001: y 32, x 64).
    src1 = mod_crop(read_image(div2k / "DIV2K_train_HR" / "0001.png"), SCALE)
    np.testing.assert_array_equal(read_image(out / "train_patches" / "hr" / "0001_s015.png"), src1[32:64, 64:96])
    np.testing.assert_array_equal(read_image(out / "train_patches" / "lr" / "0001_s015.png"),
                                  downscale_uint8(src1, SCALE)[8:16, 16:24])


def test_small_image_is_skipped_with_warning(base_data, div2k, tmp_path, caplog):
    data = _div2k_data(base_data, div2k, backbone_train=[4, 5], fusion_train=[1, 3])
    manifest = prepare(data, SCALE, tmp_path / "out")
    assert manifest["patches_per_image"] == {"0004": 15, "0005": 0}
    assert manifest["skipped_small"] == ["0005"]
    assert any("0005.png" in r.getMessage() and "smaller" in r.getMessage() for r in caplog.records)


def test_div2k_test_set_is_lr_only(base_data, div2k, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_div2k_data(base_data, div2k, test="test"), SCALE, out)
    assert manifest["test_set"] == "DIV2K_test"
    assert manifest["splits"]["eval"]["test"] == ["0901", "0902"]
    assert manifest["eval_has_hr"] == {"test": False}
    assert _stems(out / "eval" / "test" / "lr") == ["0901", "0902"]
    assert not (out / "eval" / "test" / "hr").exists()
    np.testing.assert_array_equal(read_image(out / "eval" / "test" / "lr" / "0901.png"),
                                  read_image(div2k / "DIV2K_test_LR_bicubic" / "X4" / "0901x4.png"))


def test_shared_fusion_split_reuses_backbone_images(base_data, div2k, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_div2k_data(base_data, div2k, fusion_split="shared"), SCALE, out)
    assert manifest["fusion_split"] == "shared"
    assert manifest["fusion_train_from"] == "backbone_train"
    assert manifest["splits"]["fusion_train"] == manifest["splits"]["backbone_train"] == ["0001", "0002", "0003"]
    assert _stems(out / "fusion_train" / "hr") == ["0001", "0002", "0003"]
    np.testing.assert_array_equal(read_image(out / "fusion_train" / "lr" / "0002.png"),
                                  _given_lr(read_image(div2k / "DIV2K_train_HR" / "0002.png")))


def test_benchmarks_with_and_without_lr(base_data, div2k, bench, tmp_path):
    no_lr = tmp_path / "NoLR"
    write_image(no_lr / "HR" / "zebra.png", _image(np.random.default_rng(3), 30, 37))
    data = _div2k_data(base_data, div2k, benchmarks={"Set2": str(bench), "NoLR": str(no_lr)})
    out = tmp_path / "out"
    manifest = prepare(data, SCALE, out)
    assert manifest["splits"]["eval"] == {"test": ["0801", "0802"], "NoLR": ["zebra"], "Set2": ["baby", "bird"]}
    assert manifest["lr_made"]["eval/NoLR"] == ["zebra"]
    bird = read_image(bench / "HR" / "bird.png")
    np.testing.assert_array_equal(read_image(out / "eval" / "Set2" / "hr" / "bird.png"), bird[:40, :52])
    np.testing.assert_array_equal(read_image(out / "eval" / "Set2" / "lr" / "bird.png"), _given_lr(bird))
    zebra = read_image(no_lr / "HR" / "zebra.png")
    np.testing.assert_array_equal(read_image(out / "eval" / "NoLR" / "lr" / "zebra.png"),
                                  downscale_uint8(zebra[:28, :36], SCALE))


def test_deterministic_and_stale_files_removed(base_data, div2k, tmp_path):
    data = _div2k_data(base_data, div2k)
    first, second = tmp_path / "a", tmp_path / "b"
    prepare(data, SCALE, first)
    write_image(second / "val" / "hr" / "stale.png", np.zeros((8, 8, 3), np.uint8))
    (second / "train_patches" / "hr").mkdir(parents=True)
    (second / "train_patches" / "hr" / "9999_s001.png").write_bytes(b"old")
    (second / "notes.txt").write_text("not ours")
    prepare(data, SCALE, second)
    assert (second / "notes.txt").read_text() == "not ours"      # only prepare's own folders are cleared
    (second / "notes.txt").unlink()
    assert _files(first) == _files(second)                       # byte-identical, stale files gone
    prepare(data, SCALE, first)
    assert _files(first) == _files(second)


# ---------------------------------------------------------------------------------------------------- errors


def test_corrupt_image_names_the_file(base_data, div2k, tmp_path):
    (div2k / "DIV2K_train_HR" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageError, match="0003.png"):
        prepare(_div2k_data(base_data, div2k), SCALE, tmp_path / "out")


def test_lr_size_mismatch_names_the_lr_file(base_data, div2k, tmp_path):
    write_image(div2k / "DIV2K_train_LR_bicubic" / "X4" / "0001x4.png", np.zeros((16, 25, 3), np.uint8))
    with pytest.raises(ImageError, match="0001x4.png"):
        prepare(_div2k_data(base_data, div2k), SCALE, tmp_path / "out")


def test_missing_folders_and_images_are_named(base_data, div2k, tmp_path):
    with pytest.raises(ImageError, match="0007.png"):
        prepare(_div2k_data(base_data, div2k, val=[6, 9]), SCALE, tmp_path / "out")
    with pytest.raises(ImageError, match="nowhere"):
        prepare(_div2k_data(base_data, tmp_path / "nowhere"), SCALE, tmp_path / "out")
    for p in (div2k / "DIV2K_test_LR_bicubic" / "X4").iterdir():
        p.unlink()
    (div2k / "DIV2K_test_LR_bicubic" / "X4").rmdir()
    with pytest.raises(ImageError, match="DIV2K_test_LR_bicubic"):
        prepare(_div2k_data(base_data, div2k, test="test"), SCALE, tmp_path / "out")
    with pytest.raises(ImageError, match="missing_bench"):
        prepare(_div2k_data(base_data, div2k, benchmarks={"B": str(tmp_path / "missing_bench")}), SCALE,
                tmp_path / "out")


def test_benchmark_hr_without_its_lr_is_an_error(base_data, div2k, bench, tmp_path):
    (bench / "LR_bicubic" / "X4" / "babyx4.png").unlink()
    with pytest.raises(ImageError, match="baby.png"):
        prepare(_div2k_data(base_data, div2k, benchmarks={"Set2": str(bench)}), SCALE, tmp_path / "out")


def test_bad_configuration_errors(base_data, div2k, tmp_path):
    with pytest.raises(ParamsError, match="overlaps"):
        prepare(_div2k_data(base_data, div2k, val=[3, 6]), SCALE, tmp_path / "out")
    with pytest.raises(ParamsError, match="step"):
        prepare(_div2k_data(base_data, div2k, patches={"hr_size": 32, "step": 10}), SCALE, tmp_path / "out")
    with pytest.raises(ParamsError, match="benchmarks.test"):
        prepare(_div2k_data(base_data, div2k, benchmarks={"test": str(div2k)}), SCALE, tmp_path / "out")


def test_errors_leave_previous_output_untouched(base_data, div2k, tmp_path):
    out = tmp_path / "out"
    prepare(_div2k_data(base_data, div2k), SCALE, out)
    before = _files(out)
    with pytest.raises(ImageError, match="0007.png"):  # as in test_missing_folders_and_images_are_named
        prepare(_div2k_data(base_data, div2k, val=[6, 9]), SCALE, out)
    assert _files(out) == before


# ---------------------------------------------------------------------------------------------------- samples


def _samples_data(base: dict, **splits: list[str]) -> dict:
    data = copy.deepcopy(base)
    data["source"] = "samples"
    data["samples"] = {"backbone_train": ["coins"], "fusion_train": ["clock"], "val": ["camera"], "test": ["moon"]}
    data["samples"].update(splits)
    data["patches"].update(hr_size=96, step=96)
    data["benchmarks"] = {}
    return data


def test_samples_source_tiny_split(base_data, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_samples_data(base_data), SCALE, out)
    assert manifest["splits"] == {"backbone_train": ["coins"], "fusion_train": ["clock"], "val": ["camera"],
                                  "eval": {"test": ["moon"]}}
    # coins 303x384 -> 300x384: rows at 0, 96, 192, 204; columns at 0, 96, 192, 288.
    assert manifest["num_patches"] == 16
    clock_hr = read_image(out / "fusion_train" / "hr" / "clock.png")
    assert clock_hr.shape == (300, 400, 3)
    np.testing.assert_array_equal(clock_hr[..., 0], clock_hr[..., 2])      # grayscale repeated to RGB
    np.testing.assert_array_equal(read_image(out / "fusion_train" / "lr" / "clock.png"),
                                  downscale_uint8(clock_hr, SCALE))
    assert read_image(out / "eval" / "test" / "lr" / "moon.png").shape == (128, 128, 3)


def test_sample_loaders_give_rgb_uint8():
    for name in ("motorcycle_left", "motorcycle_right", "chelsea", "gravel"):
        img = SAMPLE_LOADERS[name]()
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name


def test_sample_name_errors(base_data, tmp_path):
    with pytest.raises(ValueError, match=r"'lena'.*valid: .*astronaut"):
        prepare(_samples_data(base_data, val=["lena"]), SCALE, tmp_path / "out")
    with pytest.raises(ValueError, match="coins.*backbone_train and test"):
        prepare(_samples_data(base_data, test=["moon", "coins"]), SCALE, tmp_path / "out")


# ------------------------------------------------------------------------ all inputs checked first, outputs swapped


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def prepared(base_data, div2k, bench, tmp_path):
    """A previous run's outputs (with a benchmark set), their bytes, and the params that made them."""
    out = tmp_path / "out"
    data = _div2k_data(base_data, div2k, benchmarks={"Set2": str(bench)})
    prepare(data, SCALE, out)
    (out / "notes.txt").write_text("not ours")
    return out, _files(out), data


@pytest.fixture
def no_writes(monkeypatch):
    """Fail on any image write: what must stop before the first output."""
    def refuse(path, img):
        raise AssertionError(f"wrote {path} before every input was checked")
    monkeypatch.setattr("srmodels.data.prepare.write_image", refuse)


def test_corrupt_image_found_before_anything_is_written(prepared, div2k, tmp_path, no_writes):
    out, before, data = prepared
    # The last image prepare would reach: every earlier one would have been written by now without a check pass.
    (div2k / "DIV2K_valid_HR" / "0802.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageError, match=r"0802\.png: not a readable image"):
        prepare(data, SCALE, out)
    with pytest.raises(ImageError, match="0802.png"):
        prepare(data, SCALE, tmp_path / "fresh")
    assert _files(out) == before and not (tmp_path / "fresh").exists() and _siblings(out) == []


def test_benchmark_size_mismatch_found_before_anything_is_written(prepared, bench, no_writes):
    out, before, data = prepared
    write_image(bench / "LR_bicubic" / "X4" / "birdx4.png", np.zeros((9, 13, 3), np.uint8))  # HR 41x52 -> 10x13
    with pytest.raises(ImageError, match=r"birdx4\.png: LR size 13x9 does not match HR bird\.png"):
        prepare(data, SCALE, out)
    assert _files(out) == before and _siblings(out) == []


def test_oversized_image_is_named_with_the_limit(prepared, div2k, monkeypatch):
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)
    out, before, data = prepared
    huge_png(div2k / "DIV2K_train_HR" / "0002.png")
    with pytest.raises(ImageError, match=r"0002\.png: image is larger than OpenCV's pixel limit.*"
                                         r"OPENCV_IO_MAX_IMAGE_PIXELS"):
        prepare(data, SCALE, out)
    assert _files(out) == before


def test_missing_benchmark_hr_folder_is_named(prepared, bench):
    out, before, data = prepared
    (bench / "HR").rename(bench / "hr_elsewhere")
    with pytest.raises(ImageError, match=r"Set2/HR: no such folder"):
        prepare(data, SCALE, out)
    assert _files(out) == before


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_half_way_keeps_the_previous_outputs(prepared, monkeypatch, failure):
    out, before, data = prepared
    from srmodels.data import prepare as prepare_module

    real, calls = prepare_module.write_image, []

    def flaky(path, img):
        calls.append(path)
        if len(calls) == 20:  # inside train_patches: some folders already written, most not
            raise failure
        real(path, img)

    monkeypatch.setattr("srmodels.data.prepare.write_image", flaky)
    with pytest.raises(type(failure)):
        prepare(data, SCALE, out)
    assert len(calls) == 20 and _files(out) == before and _siblings(out) == []


def test_outputs_replaced_as_a_whole(prepared, base_data, div2k):
    out, before, _ = prepared
    # A new split without the benchmark: its eval folder must go, as must everything from the previous run.
    manifest = prepare(_div2k_data(base_data, div2k), SCALE, out)
    after = _files(out)
    assert not (out / "eval" / "Set2").exists() and after["notes.txt"] == b"not ours"
    assert json.loads(after["splits.json"]) == manifest and _siblings(out) == []
    assert set(after) < set(before)


def test_leftovers_of_a_killed_run_are_removed(prepared):
    out, before, data = prepared
    for name in (f".{out.name}.staging", f".{out.name}.old"):  # staged()'s staging and retired folders
        (out.parent / name / "val").mkdir(parents=True)
        (out.parent / name / "val" / "junk.png").write_bytes(b"old")
    prepare(data, SCALE, out)
    assert _files(out) == before and _siblings(out) == []


def test_output_folder_behind_a_symlink(base_data, div2k, tmp_path):
    real = tmp_path / "disk" / "prepared"
    real.mkdir(parents=True)
    link = tmp_path / "prepared"
    link.symlink_to(real)
    prepare(_div2k_data(base_data, div2k), SCALE, link)
    assert link.is_symlink() and (real / "splits.json").is_file() and (real / "val" / "hr" / "0006.png").is_file()
    assert _siblings(real) == [] and _siblings(link) == []


def test_a_benchmark_stage_writes_one_set_and_checks_it_first(bench, tmp_path):
    from srmodels.data.prepare import prepare_benchmark

    out = tmp_path / "set2"
    assert prepare_benchmark("Set2", str(bench), SCALE, out) == 2
    assert sorted(p.name for p in (out / "lr").iterdir()) == ["baby.png", "bird.png"]
    assert read_image(out / "hr" / "bird.png").shape == (40, 52, 3)  # mod-cropped to the LR's 4x
    # A corrupt image, even the last one, stops it before anything is written.
    (bench / "HR" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bench / "LR_bicubic" / "X4" / "zzx4.png").write_bytes((bench / "LR_bicubic" / "X4" / "babyx4.png").read_bytes())
    with pytest.raises(ImageError, match="zz.png"):
        prepare_benchmark("Set2", str(bench), SCALE, tmp_path / "again")
    assert not (tmp_path / "again").exists()
