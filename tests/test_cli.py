"""`srmodels` CLI: RFDN_AIM.pth on Set5 reproduces the official numbers; self-ensemble, tiling, bad input."""
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from srmodels.cli import compare_metrics, main

from .conftest import reference_path


@pytest.fixture(scope="module")
def set5():
    return reference_path("datasets", "Set5")


@pytest.fixture(scope="module")
def rfdn_weights():
    return reference_path("weights", "RFDN_AIM.pth")


@pytest.fixture(scope="module")
def plain_eval(set5, rfdn_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "plain.json"
    assert main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"),
                 "--lr", str(set5 / "LR_bicubic" / "X4"), "--json", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_eval_reproduces_official_rfdn_numbers(plain_eval):
    expected = json.loads(reference_path("numbers", "rfdn_aim_set5_x4.json").read_text())
    got = {r["image"]: r for r in plain_eval["images"]}
    assert set(got) == {r["image"] for r in expected["images"]}
    for ref in expected["images"]:
        assert abs(got[ref["image"]]["psnr"] - ref["psnr_y"]) <= 0.01, ref["image"]
        assert abs(got[ref["image"]]["ssim"] - ref["ssim_y"]) <= 0.0005, ref["image"]
    assert abs(plain_eval["mean_psnr"] - expected["mean_psnr_y"]) <= 0.01


def test_eval_rgb(set5, rfdn_weights, tmp_path):
    expected = json.loads(reference_path("numbers", "rfdn_aim_set5_x4.json").read_text())
    out = tmp_path / "rgb.json"
    main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"),
          "--lr", str(set5 / "LR_bicubic" / "X4"), "--rgb", "--json", str(out), "--device", "cpu"])
    assert abs(json.loads(out.read_text())["mean_psnr"] - expected["mean_psnr_rgb"]) <= 0.01


def test_self_ensemble_raises_mean_and_tiling_stays_close(set5, rfdn_weights, plain_eval, tmp_path):
    common = ["--weights", str(rfdn_weights), "--hr", str(set5 / "HR"), "--lr", str(set5 / "LR_bicubic" / "X4"),
              "--device", "cpu"]
    main(["eval", *common, "--self-ensemble", "--json", str(tmp_path / "se.json")])
    main(["eval", *common, "--tile", "32", "--json", str(tmp_path / "tile.json")])
    se = json.loads((tmp_path / "se.json").read_text())
    tiled = json.loads((tmp_path / "tile.json").read_text())
    assert se["mean_psnr"] > plain_eval["mean_psnr"]
    assert abs(tiled["mean_psnr"] - plain_eval["mean_psnr"]) <= 0.02


def test_bf16_autocast_stays_within_stated_tolerance(set5, rfdn_weights, plain_eval, tmp_path):
    # The CUDA path trains and caches under bf16 autocast; README states 0.05 dB mean / 0.1 dB per image on Set5.
    out = tmp_path / "bf16.json"
    assert main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"),
                 "--lr", str(set5 / "LR_bicubic" / "X4"), "--bf16", "--device", "cpu", "--json", str(out)]) == 0
    bf16 = json.loads(out.read_text())
    assert bf16["protocol"]["bf16"] and not plain_eval["protocol"]["bf16"]
    assert abs(bf16["mean_psnr"] - plain_eval["mean_psnr"]) <= 0.05
    fp32 = {r["image"]: r["psnr"] for r in plain_eval["images"]}
    assert all(abs(r["psnr"] - fp32[r["image"]]) <= 0.1 for r in bf16["images"])
    assert bf16["mean_psnr"] != plain_eval["mean_psnr"]  # autocast really ran in bf16


def test_eval_without_lr_uses_matlab_bicubic(set5, rfdn_weights, plain_eval, tmp_path):
    # Set5's LR files were made with MATLAB's bicubic, so ours must give the same scores.
    out = tmp_path / "nolr.json"
    main(["eval", "--weights", str(rfdn_weights), "--hr", str(set5 / "HR"), "--json", str(out), "--device", "cpu"])
    assert abs(json.loads(out.read_text())["mean_psnr"] - plain_eval["mean_psnr"]) <= 0.01


def test_upscale_and_downscale(set5, rfdn_weights, tmp_path):
    assert main(["downscale", str(set5 / "HR"), str(tmp_path / "lr"), "--scale", "4"]) == 0
    made = sorted(p.name for p in (tmp_path / "lr").iterdir())
    assert made == sorted(p.name for p in (set5 / "LR_bicubic" / "X4").iterdir())
    for name in made:  # our MATLAB bicubic reproduces the shipped LR files
        a = cv2.imread(str(tmp_path / "lr" / name))
        b = cv2.imread(str(set5 / "LR_bicubic" / "X4" / name))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert main(["upscale", "--weights", str(rfdn_weights), str(tmp_path / "lr" / "birdx4.png"),
                 "-o", str(tmp_path / "sr"), "--device", "cpu"]) == 0
    sr = cv2.imread(str(tmp_path / "sr" / "bird.png"))
    assert sr.shape == (288, 288, 3)


def _run_cli(*args):
    """The real entry point in its own process (what a user's shell sees)."""
    return subprocess.run([sys.executable, "-m", "srmodels.cli", *args], capture_output=True, text=True, timeout=120)


def test_bad_inputs_one_line_errors(set5, rfdn_weights, tmp_path, capsys, caplog):
    def _run_cli(*args):  # in-process for speed (a CLI process pays ~3 s of imports); see the evil case below
        caplog.clear()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
            print(exit_.code, file=sys.stderr)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err + caplog.text)  # log lines go to stderr too

    hr, lr = tmp_path / "hr", tmp_path / "lr"
    shutil.copytree(set5 / "HR", hr)
    shutil.copytree(set5 / "LR_bicubic" / "X4", lr)
    (hr / "notes.txt").write_text("not an image")
    (hr / "bird.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = _run_cli("eval", "--weights", str(rfdn_weights), "--hr", str(hr), "--lr", str(lr), "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "bird.png" in res.stderr and "corrupt" in res.stderr
    assert "notes.txt" in res.stderr  # ignored with a note

    shutil.copy(set5 / "HR" / "bird.png", hr / "bird.png")
    small = cv2.imread(str(lr / "birdx4.png"))[:-2]
    cv2.imwrite(str(lr / "birdx4.png"), small)
    res = _run_cli("eval", "--weights", str(rfdn_weights), "--hr", str(hr), "--lr", str(lr), "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "birdx4.png" in res.stderr and "does not match" in res.stderr

    res = _run_cli("eval", "--weights", str(rfdn_weights), "--arch", "rrdbnet_small", "--hr", str(hr),
                   "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "missing" in res.stderr
    assert "conv_first" in res.stderr

    evil = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"params": Evil()}, evil)
    res = globals()["_run_cli"]("eval", "--weights", str(evil), "--arch", "rfdn", "--hr", str(hr), "--device", "cpu")
    assert res.returncode == 2 and "arbitrary unpickling" in res.stderr and "pwned" not in res.stdout

    res = _run_cli("eval", "--weights", str(rfdn_weights), "--hr", str(tmp_path / "nope"), "--device", "cpu")
    assert res.returncode == 2 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_odd_images_converted(rfdn_weights, tmp_path):
    hr = tmp_path / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), (9, 9), 3)
    cv2.imwrite(str(hr / "gray.png"), smooth[:, :, 0])
    cv2.imwrite(str(hr / "alpha.png"), np.dstack([smooth, np.full((96, 96), 255, np.uint8)]))
    cv2.imwrite(str(hr / "deep.png"), smooth.astype(np.uint16) * 257)
    res = _run_cli("eval", "--weights", str(rfdn_weights), "--hr", str(hr), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    for said in ("grayscale image converted", "alpha channel dropped", "16-bit image converted"):
        assert res.stderr.count(said) == 1, res.stderr


def test_compare_metrics_tolerances():
    old = {"sets": {"test": {"fusion": {"psnr_y": 30.0, "ssim_y": 0.9}, "num_images": 3}}}
    assert compare_metrics(old, old, 0.01, 0.001) == []
    new = {"sets": {"test": {"fusion": {"psnr_y": 30.02, "ssim_y": 0.9005}, "num_images": 3}}}
    problems = compare_metrics(old, new, 0.01, 0.001)
    assert len(problems) == 1 and "psnr_y" in problems[0]
    assert compare_metrics(old, {"sets": {}}, 0.01, 0.001)


def test_bench_prints_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "rfdn_tiny", "fusion", "--sizes", "32x24", "--runs", "1", "--warmup", "0",
                 "--self-ensemble", "--cpu-only", "--fusion-train", "2:8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["forward"]
    assert [(r["model"], r["self_ensemble"]) for r in rows] == [
        ("rfdn_tiny", False), ("rfdn_tiny", True), ("fusion", False)]
    assert all(r["ms"] > 0 and r["input"] == "32x24" and r["device"] == "cpu" for r in rows)
    (train,) = result["fusion_train"]
    assert train["batch"] == 2 and train["hr_patch"] == 32 and train["samples_per_s"] > 0
    # The projection is the recipe's sample count at the measured rate.
    assert train["ntire_recipe_minutes"] == pytest.approx(150 * 800 / train["samples_per_s"] / 60, rel=0.01)
    printed = capsys.readouterr().out
    assert "ms/forward" in printed and "NTIRE min" in printed
