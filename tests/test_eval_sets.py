"""`srmodels eval` on several benchmark sets: set folders read as the pipeline reads data.benchmarks, one table.

Tiny models and image folders are built here; the Set5 test uses ../shared/reference and skips without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from srmodels.evaluation.evaluation import (benchmark_set, check_benchmark_sets, image_scores, mean_scores,
                                 score_benchmark_sets)
from srmodels.data.images import ImageError, read_image, write_image
from srmodels.data.imresize import downscale_uint8, imresize_uint8
from srmodels.metrics.psnr_ssim import calculate_psnr, calculate_ssim
from srmodels.data.prepare import plan_set, prepare_benchmark, set_folders
from srmodels.evaluation.report import sets_table

from .helpers import SCALE, reference_path, refuse_model_load

def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random RGB image (bicubic and SR scores are then finite and far from each other's rounding)."""
    import cv2

    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2)


def _folder(root: Path, stems_sizes: dict[str, tuple[int, int]], *, seed: int, with_lr: bool, bare: bool = False):
    """A benchmark folder: HR in root/HR/ (or directly in root when ``bare``), LR in root/LR_bicubic/X4/."""
    rng = np.random.default_rng(seed)
    for stem, (h, w) in stems_sizes.items():
        hr = _smooth(rng, h, w)
        write_image(root / ("" if bare else "HR") / f"{stem}.png", hr)
        if with_lr:
            write_image(root / "LR_bicubic" / "X4" / f"{stem}x4.png",
                        downscale_uint8(hr[: h // SCALE * SCALE, : w // SCALE * SCALE], SCALE))
    return root


@pytest.fixture
def sets(tmp_path):
    """Two benchmark folders: 'given' with LR files (one HR not a multiple of 4), 'bare' with HR images only."""
    given = _folder(tmp_path / "given", {"bird": (66, 64), "baby": (64, 72)}, seed=1, with_lr=True)
    bare = _folder(tmp_path / "bare", {"zebra": (68, 64)}, seed=2, with_lr=False, bare=True)
    return given, bare


@pytest.fixture
def weights(tmp_path):
    """A self-describing rfdn_tiny checkpoint (random weights: the numbers, not their quality, are tested)."""
    import torch

    from srmodels.models.checkpoint import save_checkpoint
    from srmodels.models.model import build_model

    torch.manual_seed(0)
    model = build_model("rfdn_tiny")
    save_checkpoint(tmp_path / "w.pth", model.net.state_dict(), **model.describe())
    return tmp_path / "w.pth"


def _bicubic(lr: np.ndarray, _entry) -> np.ndarray:
    return imresize_uint8(lr, scale=SCALE)


# ------------------------------------------------------------------------------------------- reading a set folder


def test_set_folder_layouts(sets, tmp_path):
    given, bare = sets
    assert set_folders(given, SCALE, what="x") == (given / "HR", given / "LR_bicubic" / "X4")
    assert set_folders(bare, SCALE, what="x") == (bare, None)  # no HR/: the images in the folder are HR
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"empty/HR: no such folder, and .*empty holds no images itself \(--set E\)"):
        set_folders(tmp_path / "empty", SCALE, what="--set E")
    with pytest.raises(ImageError, match=r"nowhere: benchmark folder of --set N=nowhere not found"):
        set_folders(tmp_path / "nowhere", SCALE, what="--set N=nowhere")


def test_plan_set_pairs_and_refuses_what_it_cannot_score(sets, tmp_path):
    given, _ = sets
    entries = plan_set(given / "HR", given / "LR_bicubic" / "X4", SCALE, what="x")
    assert [(e.stem, e.lr_path.name) for e in entries] == [("baby", "babyx4.png"), ("bird", "birdx4.png")]
    (given / "LR_bicubic" / "X4" / "birdx4.png").unlink()
    with pytest.raises(ImageError, match=r"HR/bird.png: no LR image named birdx4"):
        plan_set(given / "HR", given / "LR_bicubic" / "X4", SCALE, what="x")
    write_image(given / "HR" / "baby.bmp", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ImageError, match=r"baby.png: same name as baby.bmp \(--set G=g\)"):
        plan_set(given / "HR", None, SCALE, what="--set G=g")
    (tmp_path / "none" / "HR").mkdir(parents=True)
    with pytest.raises(ImageError, match=r"none/HR: no images \(--set N=none\)"):
        plan_set(tmp_path / "none" / "HR", None, SCALE, what="--set N=none")


def test_the_pipeline_reads_a_bare_folder_like_eval(sets, tmp_path):
    # data.benchmarks and `eval --set` share set_folders/plan_set: a folder of HR images is a set for both,
    # and the benchmark stage prepares exactly the HR/LR pairs eval scores.
    _, bare = sets
    assert prepare_benchmark("bare", str(bare), SCALE, tmp_path / "prepared") == 1
    hr = read_image(tmp_path / "prepared" / "hr" / "zebra.png")
    lr = read_image(tmp_path / "prepared" / "lr" / "zebra.png")
    assert hr.shape == (68, 64, 3)
    np.testing.assert_array_equal(lr, downscale_uint8(hr, SCALE))
    scored = score_benchmark_sets([benchmark_set("bare", bare, SCALE, what="x")], _bicubic, scale=SCALE,
                                  crop_border=4)
    expected = image_scores(imresize_uint8(lr, scale=SCALE), hr, crop_border=4)
    assert scored["bare"]["images"] == [{"image": "zebra", **{k: round(v, 4) for k, v in expected.items()}}]


# ------------------------------------------------------------------------------------------- scoring and averaging


def test_image_scores_are_the_metrics_with_explicit_arguments():
    rng = np.random.default_rng(5)
    hr, sr = _smooth(rng, 40, 36), _smooth(rng, 40, 36)
    got = image_scores(sr, hr, crop_border=3)
    assert got == {"psnr_y": calculate_psnr(sr, hr, crop_border=3, y_channel=True),
                   "ssim_y": calculate_ssim(sr, hr, crop_border=3, y_channel=True),
                   "psnr_rgb": calculate_psnr(sr, hr, crop_border=3, y_channel=False),
                   "ssim_rgb": calculate_ssim(sr, hr, crop_border=3, y_channel=False)}


def test_mean_scores_average_unrounded_values():
    # Rounded first, these would average to 0.0000; the unrounded mean is 0.0000733 -> 0.0001.
    scores = [{"psnr_y": 0.00004}, {"psnr_y": 0.00004}, {"psnr_y": 0.00014}]
    assert mean_scores(scores) == {"psnr_y": 0.0001}


def test_score_benchmark_sets_keeps_the_order_and_makes_missing_lr(sets):
    given, bare = sets
    benches = [benchmark_set("zz_given", given, SCALE, what="a"), benchmark_set("aa_bare", bare, SCALE, what="b")]
    assert check_benchmark_sets(benches, scale=SCALE, crop_border=4) == 3
    scored = score_benchmark_sets(benches, _bicubic, scale=SCALE, crop_border=4)
    assert list(scored) == ["zz_given", "aa_bare"]  # as given, not sorted
    assert scored["zz_given"]["lr"] == "given" and scored["aa_bare"]["lr"] == "matlab bicubic of HR"
    assert [r["image"] for r in scored["zz_given"]["images"]] == ["baby", "bird"]
    # bird is 66x64: mod-cropped to 64x64 before scoring, as the pipeline prepares it.
    hr = read_image(given / "HR" / "bird.png")[:64]
    lr = read_image(given / "LR_bicubic" / "X4" / "birdx4.png")
    per_image = [image_scores(imresize_uint8(read_image(given / "LR_bicubic" / "X4" / "babyx4.png"), scale=SCALE),
                              read_image(given / "HR" / "baby.png"), crop_border=4),
                 image_scores(imresize_uint8(lr, scale=SCALE), hr, crop_border=4)]
    assert scored["zz_given"]["mean"] == mean_scores(per_image)
    assert scored["zz_given"]["num_images"] == 2


def test_check_refuses_an_image_too_small_for_the_crop_border(tmp_path):
    small = _folder(tmp_path / "small", {"s": (24, 24)}, seed=3, with_lr=False)
    bench = [benchmark_set("small", small, SCALE, what="x")]
    assert check_benchmark_sets(bench, scale=SCALE, crop_border=6) == 1  # 24 - 12 = 12 >= 11
    with pytest.raises(ImageError, match=r"s.png: 24x24 leaves less than 11x11 pixels after the 7-pixel crop border"):
        check_benchmark_sets(bench, scale=SCALE, crop_border=7)


# ------------------------------------------------------------------------------------------------------- the table


def test_sets_table_layout():
    results = {"a": {"Set5": {"psnr_y": 32.1553, "ssim_y": 0.89378}, "Urban100": {"psnr_y": 26.004, "ssim_y": 0.8}},
               "b": {"Set5": {"psnr_y": 32.2, "ssim_y": 0.89381}}}
    assert sets_table(results, {"Set5": 5, "Urban100": 100}) == (
        "| Model | Set5 (5) | Urban100 (100) |\n"
        "|:---|:---:|:---:|\n"
        "| a | 32.16 / **0.8938** | 26.00 / 0.8000 |\n"   # ties as displayed are both bold
        "| b | **32.20** / **0.8938** | – / – |\n")       # a lone value in a column is not bold


# ----------------------------------------------------------------------------------------------- the command line


def test_eval_several_sets_one_table(sets, weights, cli, tmp_path):
    given, bare = sets
    args = ["eval", "--weights", weights, "--set", f"Given={given}", "--set", f"Bare={bare}", "--device", "cpu"]
    code, out, err = cli(*args, "--json", tmp_path / "r.json", "--table", tmp_path / "t.md")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "| Model | Given (2) | Bare (1) |" and lines[1] == "|:---|:---:|:---:|"
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["sets"]) == ["Given", "Bare"]
    given_mean = result["sets"]["Given"]["mean"]
    assert lines[2] == f"| rfdn_tiny | {given_mean['psnr_y']:.2f} / {given_mean['ssim_y']:.4f} | " \
                       f"{result['sets']['Bare']['mean']['psnr_y']:.2f} / {result['sets']['Bare']['mean']['ssim_y']:.4f} |"
    assert "LR made from HR with the MATLAB bicubic: Bare" in out
    assert (tmp_path / "t.md").read_text() == out  # --table is what was printed
    assert result["protocol"] == {"scale": 4, "crop_border": 4, "y_channel": True, "self_ensemble": False,
                                  "tile": None, "tile_overlap": 16, "bf16": False, "plain": False,
                                  "table": "psnr_y / ssim_y"}
    rows = result["sets"]["Given"]["images"]
    assert [r["image"] for r in rows] == ["baby", "bird"]
    assert set(rows[0]) == {"image", "psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"}
    assert result["sets"]["Bare"]["lr_folder"] is None and result["sets"]["Given"]["lr"] == "given"
    # Deterministic: a second run writes the same bytes.
    code, again, _ = cli(*args, "--json", tmp_path / "r2.json")
    assert code == 0 and again == out and (tmp_path / "r2.json").read_bytes() == (tmp_path / "r.json").read_bytes()


def test_self_ensemble_and_label_reach_the_table(sets, weights, cli, tmp_path):
    given, _ = sets
    code, out, _ = cli("eval", "--weights", weights, "--set", f"G={given}", "--self-ensemble", "--label", "mine",
                       "--device", "cpu", "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and out.splitlines()[2].startswith("| mine | ") and "x8 self-ensemble" in out
    assert result["protocol"]["self_ensemble"] and result["model"]["label"] == "mine"


@pytest.mark.parametrize("case", ["no_equals", "empty_name", "bad_name", "empty_dir", "twice", "missing",
                                  "empty_set", "lr_with_set", "json_is_a_folder", "bad_image"])
def test_bad_sets_are_one_line_before_any_work(case, sets, weights, cli, tmp_path, monkeypatch):
    given, bare = sets
    (tmp_path / "empty" / "HR").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    spec, needle = {
        "no_equals": (["--set", str(given)], f"--set {given}: expected NAME=DIR"),
        "empty_name": (["--set", f"={given}"], "is not usable as a set name"),
        "bad_name": (["--set", f"a/b={given}"], "--set a/b="),
        "empty_dir": (["--set", "G="], "--set G=: expected NAME=DIR"),
        "twice": (["--set", f"G={given}", "--set", f"G={bare}"], f"--set G={bare}: the set name G is given twice"),
        "missing": (["--set", f"G={given}", "--set", f"M={tmp_path / 'nope'}"], f"of --set M={tmp_path / 'nope'} not found"),
        "empty_set": (["--set", f"E={tmp_path / 'empty'}"], f"no images (--set E={tmp_path / 'empty'})"),
        "lr_with_set": (["--set", f"G={given}", "--lr", str(given)], "--lr"),
        "json_is_a_folder": (["--set", f"G={given}", "--json", str(tmp_path / "out")], "must be a file"),
        "bad_image": (["--set", f"G={given}", "--set", f"B={bare}"], "zebra.png: not a readable image"),
    }[case]
    if case == "bad_image":
        (bare / "zebra.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    if case != "json_is_a_folder":
        spec = [*spec, "--json", str(tmp_path / "out" / "r.json")]
    refuse_model_load(monkeypatch)
    code, out, err = cli("eval", "--weights", weights, *spec, "--table", tmp_path / "out" / "t.md", "--device", "cpu")
    assert code == 2 and "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("srmodels: error: ") and needle in last, last
    assert list((tmp_path / "out").iterdir()) == []  # no partial output


def test_eval_needs_sets_or_hr(weights, sets, cli):
    given, _ = sets
    for args in ([], ["--set", f"G={given}", "--hr", str(given / "HR")]):
        with pytest.raises(SystemExit) as exit_:
            cli("eval", "--weights", weights, *args)
        assert exit_.value.code == 2


# ---------------------------------------------------------------------------------------------- Set5 (reference)


def test_set5_twice_in_one_table_matches_the_official_numbers(cli, tmp_path):
    set5 = reference_path("datasets", "Set5")
    weights = reference_path("weights", "RFDN_AIM.pth")
    expected = json.loads(reference_path("numbers", "rfdn_aim_set5_x4.json").read_text())
    code, out, err = cli("eval", "--weights", weights, "--arch", "rfdn", "--set", f"Set5={set5}",
                         "--set", f"Set5_madeLR={set5 / 'HR'}", "--device", "cpu", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())["sets"]
    assert result["Set5"]["lr"] == "given" and result["Set5_madeLR"]["lr"] == "matlab bicubic of HR"
    for name in ("Set5", "Set5_madeLR"):  # our MATLAB bicubic reproduces Set5's LR files: the same scores
        assert abs(result[name]["mean"]["psnr_y"] - expected["mean_psnr_y"]) <= 0.01, name
        got = {r["image"]: r for r in result[name]["images"]}
        for ref in expected["images"]:
            assert abs(got[ref["image"]]["psnr_y"] - ref["psnr_y"]) <= 0.01, (name, ref["image"])
            assert abs(got[ref["image"]]["ssim_y"] - ref["ssim_y"]) <= 0.0005, (name, ref["image"])
    assert out.splitlines()[0] == "| Model | Set5 (5) | Set5_madeLR (5) |"
