"""srmodels.evaluation.report: weight maps, the comparison table, CSV and deterministic PNG plots."""
from __future__ import annotations

import csv
import hashlib

import cv2
import numpy as np
import pytest

from srmodels.evaluation.report import (KNOWN_COLOURS, bar_chart_png, colours_for, curves_png, markdown_table,
                             weight_map_image, write_csv)

NAMES = ["dat", "swinir", "rfdn"]


def one_hot_weights(h: int = 64, w: int = 96) -> np.ndarray:
    """Three vertical bands, each owned entirely by one member, and a 50/50 DAT/SwinIR band."""
    wts = np.zeros((3, h, w), dtype=np.float32)
    wts[0, :, :24] = 1
    wts[1, :, 24:48] = 1
    wts[2, :, 48:72] = 1
    wts[0, :, 72:] = 0.5
    wts[1, :, 72:] = 0.5
    return wts


def test_weight_map_pure_and_mixed_colours_and_legend():
    img = weight_map_image(one_hot_weights(), NAMES)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 64, "a legend strip below the map"
    assert img.shape[1] >= 96
    assert tuple(img[10, 5]) == KNOWN_COLOURS["dat"]          # weight 1 on DAT: pure DAT colour
    assert tuple(img[10, 30]) == KNOWN_COLOURS["swinir"]
    assert tuple(img[10, 60]) == KNOWN_COLOURS["rfdn"]
    mixed = (np.array(KNOWN_COLOURS["dat"]) + np.array(KNOWN_COLOURS["swinir"])) / 2
    assert np.abs(img[10, 80].astype(float) - mixed).max() <= 1
    legend = img[64:]
    assert (legend < 100).all(axis=2).any(), "legend text is drawn (dark pixels)"
    for colour in (KNOWN_COLOURS[n] for n in NAMES):      # each swatch appears in the legend
        assert (legend == np.array(colour, dtype=np.uint8)).all(axis=2).sum() > 10


def test_weight_map_is_deterministic_and_order_independent_colours():
    a = weight_map_image(one_hot_weights(), NAMES)
    b = weight_map_image(one_hot_weights(), NAMES)
    assert np.array_equal(a, b)
    # A backbone keeps its colour whatever the members' order: same maps under reordered names, same picture.
    swapped = weight_map_image(one_hot_weights()[[1, 0, 2]], ["swinir", "dat", "rfdn"])
    assert np.array_equal(swapped[:64, :96], a[:64, :96])
    # Unknown names get distinct colours; a tiny map is widened to fit its legend.
    small = weight_map_image(np.full((4, 8, 8), 0.25), ["a", "b", "c", "d"])
    assert small.shape[1] > 8
    assert len(set(colours_for(["a", "b", "c", "d", "dat"]))) == 5
    assert len(set(colours_for([f"m{i}" for i in range(30)]))) == 30


def test_weight_map_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2 names"):
        weight_map_image(np.zeros((3, 4, 4)), ["dat", "swinir"])
    with pytest.raises(ValueError, match="shape"):
        weight_map_image(np.zeros((4, 4)), ["dat"])


def test_weight_map_encodes_with_cv2(tmp_path):
    """The map is a plain RGB uint8 array: a PNG written by OpenCV reads back pixel for pixel."""
    img = weight_map_image(one_hot_weights(), NAMES)
    assert cv2.imwrite(str(tmp_path / "w.png"), img[:, :, ::-1])
    back = cv2.imread(str(tmp_path / "w.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8 and back.shape == img.shape
    assert np.array_equal(back[:, :, ::-1], img)
    assert tuple(back[10, 5][::-1]) == KNOWN_COLOURS["dat"]  # RGB in the array, BGR in OpenCV's file order


ROWS = [
    {"model": "bicubic", "set": "test", "psnr_y": 24.1, "ssim_y": 0.70001, "psnr_rgb": 22.5},
    {"model": "dat", "set": "test", "psnr_y": 27.356, "ssim_y": 0.8123, "psnr_rgb": 25.9},
    {"model": "dat+x8", "set": "test", "psnr_y": 27.50, "ssim_y": 0.8120, "psnr_rgb": 26.1},
    {"model": "fusion", "set": "test", "psnr_y": 27.504, "ssim_y": 0.8150, "psnr_rgb": 26.0},
    {"model": "bicubic", "set": "Set5", "psnr_y": 28.4, "ssim_y": 0.81, "psnr_rgb": 26.7},
    {"model": "fusion", "set": "Set5", "psnr_y": 31.9, "ssim_y": 0.89},
]


def test_markdown_table_layout_and_bold_best():
    md = markdown_table(ROWS)
    lines = md.strip().splitlines()
    assert lines[0] == ("| Model | test PSNR-Y | test SSIM-Y | test PSNR-RGB | Set5 PSNR-Y | Set5 SSIM-Y "
                        "| Set5 PSNR-RGB |")
    assert lines[1] == "|:---|" + "---:|" * 6
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["bicubic", "dat", "dat+x8", "fusion"]
    dat_x8 = lines[4].split(" | ")
    fusion = lines[5].split(" | ")
    assert dat_x8[1] == "**27.50**" and fusion[1] == "**27.50**"     # a tie as displayed: both bold
    assert fusion[2] == "**0.8150**" and "0.8123" in lines[3]        # SSIM with 4 decimals
    assert dat_x8[3] == "**26.10**"
    assert lines[3].split(" | ")[4] == "–"                           # dat was not scored on Set5
    assert fusion[6].rstrip(" |") == "–" and "**26.70**" not in md   # a lone value is not 'best'
    assert "**31.90**" in fusion[4]


def test_markdown_table_order_and_duplicates():
    md = markdown_table(ROWS, sets=["Set5"], models=["fusion", "bicubic"], metrics=[("psnr_y", "PSNR")])
    assert md.splitlines()[0] == "| Model | Set5 PSNR |"
    assert md.splitlines()[2] == "| fusion | **31.90** |"
    with pytest.raises(ValueError, match="two rows"):
        markdown_table(ROWS + [ROWS[0]])


def test_write_csv_round_trips(tmp_path):
    path = write_csv(tmp_path / "sub" / "scores.csv", ROWS)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["model", "set", "psnr_y", "ssim_y", "psnr_rgb"]
    assert float(back[1]["psnr_y"]) == 27.356 and back[5]["psnr_rgb"] == ""
    assert not list(tmp_path.glob("sub/.*tmp*")), "no temporary file left behind"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pngs_are_byte_identical_across_runs(tmp_path):
    results = {"bicubic": 24.1, "dat": 27.36, "dat+x8": 27.5, "swinir": 27.2, "fusion": 27.6}
    curves = {"dat": [(1, 25.0), (2, 26.1), (3, 26.4)], "swinir": [(1, 24.8), (2, 25.9), (3, 26.6)]}
    a = bar_chart_png(tmp_path / "a.png", results, "test PSNR-Y")
    b = bar_chart_png(tmp_path / "b.png", dict(results), "test PSNR-Y")
    c = curves_png(tmp_path / "c.png", curves, "PSNR-Y (dB)", "validation")
    d = curves_png(tmp_path / "d.png", curves, "PSNR-Y (dB)", "validation")
    assert digest(a) == digest(b) and digest(c) == digest(d)
    assert digest(a) != digest(c)
    data = a.read_bytes()
    assert data.startswith(b"\x89PNG") and b"matplotlib" not in data and b"Software" not in data
    img = cv2.imread(str(c))
    assert img.shape == (400, 640, 3)


def pixels_of(path, rgb: tuple[int, int, int]) -> int:
    """How many pixels of the PNG at ``path`` have exactly the colour ``rgb``."""
    return int((cv2.imread(str(path))[:, :, ::-1] == np.array(rgb, dtype=np.uint8)).all(axis=2).sum())


def test_plots_survive_empty_and_missing_values(tmp_path):
    empty = bar_chart_png(tmp_path / "empty.png", {}, "nothing")
    nan = bar_chart_png(tmp_path / "nan.png", {"dat": float("nan"), "fusion": 27.0}, "one missing")
    both = bar_chart_png(tmp_path / "both.png", {"dat": 27.0, "fusion": 27.0}, "one missing")
    curves = curves_png(tmp_path / "curves.png", {"dat": []}, "loss", "empty")
    for path in (empty, nan, curves):
        assert cv2.imread(str(path)).shape == (400, 640, 3)  # a full-size figure, not an error
    # Only missing values is no data at all: the same picture as no models, and no bar drawn.
    assert bar_chart_png(tmp_path / "all-nan.png", {"dat": float("nan")}, "nothing").read_bytes() == empty.read_bytes()
    assert pixels_of(empty, KNOWN_COLOURS["dat"]) == 0
    # A missing value hides its bar and leaves the others as they would be.
    assert pixels_of(nan, KNOWN_COLOURS["dat"]) == 0 < pixels_of(both, KNOWN_COLOURS["dat"])
    assert pixels_of(nan, KNOWN_COLOURS["fusion"]) == pixels_of(both, KNOWN_COLOURS["fusion"]) > 1000
    # A curve without points draws nothing: the same picture as no curves at all.
    assert curves_png(tmp_path / "none.png", {}, "loss", "empty").read_bytes() == curves.read_bytes()
