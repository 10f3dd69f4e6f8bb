"""`srmodels` CLI: RFDN_AIM.pth on Set5 reproduces the official numbers; self-ensemble, tiling, bad input."""
import copy
import json
import logging
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from srmodels.cli import compare_metrics, main

from .helpers import huge_png, reference_path, refuse_model_load


@pytest.fixture(scope="module")
def set5():
    return reference_path("datasets", "Set5")


@pytest.fixture(scope="module")
def rfdn_weights():
    return reference_path("weights", "RFDN_AIM.pth")


def _one_set(path):
    """The only set of an `eval --json` file (the --hr form scores one set, named after the folder)."""
    (result,) = json.loads(path.read_text())["sets"].values()
    return result


@pytest.fixture(scope="module")
def plain_eval(set5, rfdn_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "plain.json"
    assert main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"),
                 "--lr", str(set5 / "LR_bicubic" / "X4"), "--json", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert list(result["sets"]) == ["Set5"]  # Set5/HR -> Set5
    return {**result["sets"]["Set5"], "protocol": result["protocol"]}


def test_eval_reproduces_official_rfdn_numbers(plain_eval):
    expected = json.loads(reference_path("numbers", "rfdn_aim_set5_x4.json").read_text())
    got = {r["image"]: r for r in plain_eval["images"]}
    assert set(got) == {r["image"] for r in expected["images"]}
    for ref in expected["images"]:
        assert abs(got[ref["image"]]["psnr_y"] - ref["psnr_y"]) <= 0.01, ref["image"]
        assert abs(got[ref["image"]]["ssim_y"] - ref["ssim_y"]) <= 0.0005, ref["image"]
        assert abs(got[ref["image"]]["psnr_rgb"] - ref["psnr_rgb"]) <= 0.01, ref["image"]
    assert abs(plain_eval["mean"]["psnr_y"] - expected["mean_psnr_y"]) <= 0.01


def test_eval_rgb(set5, rfdn_weights, tmp_path, capsys):
    expected = json.loads(reference_path("numbers", "rfdn_aim_set5_x4.json").read_text())
    out = tmp_path / "rgb.json"
    main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"),
          "--lr", str(set5 / "LR_bicubic" / "X4"), "--rgb", "--json", str(out), "--device", "cpu"])
    mean = _one_set(out)["mean"]
    assert abs(mean["psnr_rgb"] - expected["mean_psnr_rgb"]) <= 0.01
    assert f"| {mean['psnr_rgb']:.2f} / {mean['ssim_rgb']:.4f} |" in capsys.readouterr().out  # the table shows RGB


def test_self_ensemble_raises_psnr_and_tiling_stays_close(set5, rfdn_weights, plain_eval, tmp_path):
    """On every Set5 image: the x8 self-ensemble scores higher than the plain model, tiles of 32 within 0.02 dB."""
    common = ["--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"), "--lr",
              str(set5 / "LR_bicubic" / "X4"), "--device", "cpu"]
    assert main(["eval", *common, "--self-ensemble", "--json", str(tmp_path / "se.json")]) == 0
    assert main(["eval", *common, "--tile", "32", "--json", str(tmp_path / "tile.json")]) == 0
    plain = {r["image"]: r["psnr_y"] for r in plain_eval["images"]}
    se = {r["image"]: r["psnr_y"] for r in _one_set(tmp_path / "se.json")["images"]}
    tiled = {r["image"]: r["psnr_y"] for r in _one_set(tmp_path / "tile.json")["images"]}
    assert set(se) == set(tiled) == set(plain) and len(plain) == 5
    assert all(se[stem] > plain[stem] for stem in plain), (se, plain)
    assert all(abs(tiled[stem] - plain[stem]) <= 0.02 for stem in plain), (tiled, plain)
    assert _one_set(tmp_path / "se.json")["mean"]["psnr_y"] > plain_eval["mean"]["psnr_y"]


def test_bf16_autocast_stays_within_stated_tolerance(set5, rfdn_weights, plain_eval, tmp_path):
    # The CUDA path trains and caches under bf16 autocast; docs/speed.md states 0.05 dB mean / 0.1 dB per image on Set5.
    out = tmp_path / "bf16.json"
    assert main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"),
                 "--lr", str(set5 / "LR_bicubic" / "X4"), "--bf16", "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"]["bf16"] and not plain_eval["protocol"]["bf16"]
    bf16 = _one_set(out)
    assert abs(bf16["mean"]["psnr_y"] - plain_eval["mean"]["psnr_y"]) <= 0.05
    fp32 = {r["image"]: r["psnr_y"] for r in plain_eval["images"]}
    assert all(abs(r["psnr_y"] - fp32[r["image"]]) <= 0.1 for r in bf16["images"])
    assert bf16["mean"]["psnr_y"] != plain_eval["mean"]["psnr_y"]  # autocast really ran in bf16


def test_eval_without_lr_uses_matlab_bicubic(set5, rfdn_weights, plain_eval, tmp_path):
    # Set5's LR files were made with MATLAB's bicubic, so ours must give the same scores.
    out = tmp_path / "nolr.json"
    assert main(["eval", "--weights", str(rfdn_weights), "--arch", "rfdn", "--hr", str(set5 / "HR"), "--json",
                 str(out), "--device", "cpu"]) == 0
    made = _one_set(out)
    assert made["lr"] == "matlab bicubic of HR" and plain_eval["lr"] == "given"
    assert abs(made["mean"]["psnr_y"] - plain_eval["mean"]["psnr_y"]) <= 0.01


def test_upscale_and_downscale(set5, rfdn_weights, tmp_path):
    assert main(["downscale", str(set5 / "HR"), str(tmp_path / "lr"), "--scale", "4"]) == 0
    made = sorted(p.name for p in (tmp_path / "lr").iterdir())
    assert made == sorted(p.name for p in (set5 / "LR_bicubic" / "X4").iterdir())
    for name in made:  # our MATLAB bicubic reproduces the shipped LR files
        a = cv2.imread(str(tmp_path / "lr" / name))
        b = cv2.imread(str(set5 / "LR_bicubic" / "X4" / name))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # --arch: recognising released weights by their keys and shapes builds every variant (about 2 s);
    # test_checkpoint.py's test_released_rfdn_recognised_and_scaled checks that, what the CLI calls without --arch.
    assert main(["upscale", "--weights", str(rfdn_weights), "--arch", "rfdn", str(tmp_path / "lr" / "birdx4.png"),
                 "-o", str(tmp_path / "sr"), "--device", "cpu"]) == 0
    sr = cv2.imread(str(tmp_path / "sr" / "bird.png"))
    assert sr.shape == (288, 288, 3)


def _cli_process(*args):
    """The real entry point in its own process (what a user's shell sees)."""
    return subprocess.run([sys.executable, "-m", "srmodels.cli", *args], capture_output=True, text=True, timeout=120)


def test_bad_inputs_one_line_errors(set5, rfdn_weights, tmp_path, capsys, caplog):
    def _run_cli(*args):  # in-process for speed (a CLI process pays ~3 s of imports); the evil case uses a process
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
    res = _cli_process("eval", "--weights", str(evil), "--arch", "rfdn", "--hr", str(hr), "--device", "cpu")
    assert res.returncode == 2 and "arbitrary unpickling" in res.stderr and "pwned" not in res.stdout

    res = _run_cli("eval", "--weights", str(rfdn_weights), "--hr", str(tmp_path / "nope"), "--device", "cpu")
    assert res.returncode == 2 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_odd_images_converted(rfdn_weights, tmp_path, cli, caplog):
    """Grayscale, RGBA and 16-bit HR images are scored, each with one warning naming it (in-process: the log
    records are what a process prints on stderr; test_oversized_image_in_a_real_process_ends_in_one_line runs one)."""
    hr = tmp_path / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), (9, 9), 3)
    cv2.imwrite(str(hr / "gray.png"), smooth[:, :, 0])
    cv2.imwrite(str(hr / "alpha.png"), np.dstack([smooth, np.full((96, 96), 255, np.uint8)]))
    cv2.imwrite(str(hr / "deep.png"), smooth.astype(np.uint16) * 257)
    with caplog.at_level(logging.WARNING):
        code, _, err = cli("eval", "--weights", rfdn_weights, "--arch", "rfdn", "--hr", hr, "--device", "cpu",
                           "--json", tmp_path / "r.json")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, said in (("gray.png", "grayscale image converted"), ("alpha.png", "alpha channel dropped"),
                       ("deep.png", "16-bit image converted")):
        assert [w for w in warnings if said in w and name in w] == [w for w in warnings if said in w], warnings
        assert sum(said in w for w in warnings) == 1, warnings
    assert sorted(r["image"] for r in _one_set(tmp_path / "r.json")["images"]) == ["alpha", "deep", "gray"]


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


# ------------------------------------------------------------------ one-line failures on tiny files (no reference pack)


@pytest.fixture
def tiny(tmp_path):
    """A self-describing rfdn_tiny checkpoint, two 64x64 HR images and their 16x16 LR images."""
    from srmodels.models.checkpoint import save_checkpoint
    from srmodels.models.model import build_model

    model = build_model("rfdn_tiny")
    save_checkpoint(tmp_path / "w.pth", model.net.state_dict(), **model.describe())
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        (tmp_path / "hr").mkdir(exist_ok=True)
        (tmp_path / "lr").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "hr" / f"{stem}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / "lr" / f"{stem}x4.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return tmp_path


def _one_line_error(code, err, *needles):
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("srmodels: error: "), err
    for needle in needles:
        assert needle in last, last
    return last


def test_oversized_image_header_is_one_line_in_every_command(tiny, cli, monkeypatch):
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)
    huge_png(tiny / "hr" / "huge.png")
    refuse_model_load(monkeypatch)
    for args in (["eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--device", "cpu"],
                 ["upscale", "--weights", tiny / "w.pth", tiny / "hr", "-o", tiny / "out", "--device", "cpu"],
                 ["downscale", tiny / "hr", tiny / "out"]):
        code, _, err = cli(*args)
        last = _one_line_error(code, err, "huge.png", "OpenCV's pixel limit", "40000x40000",
                               "OPENCV_IO_MAX_IMAGE_PIXELS")
        assert last.count("huge.png") == 1
    assert not (tiny / "out").exists()  # nothing written: the bad image was found first


def test_oversized_image_in_a_real_process_ends_in_one_line(tiny):
    huge_png(tiny / "lr" / "huge.png")
    res = _cli_process("upscale", "--weights", str(tiny / "w.pth"), str(tiny / "lr"), "-o", str(tiny / "out"),
                   "--device", "cpu")
    _one_line_error(res.returncode, res.stderr, "huge.png", "OPENCV_IO_MAX_IMAGE_PIXELS")


def test_upscale_output_that_is_a_file(tiny, cli, monkeypatch):
    refuse_model_load(monkeypatch)
    (tiny / "taken.png").write_bytes(b"keep me")
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "lr" / "ax4.png", "-o", tiny / "taken.png")
    _one_line_error(code, err, "taken.png", "must be a folder", "existing file")
    assert (tiny / "taken.png").read_bytes() == b"keep me"
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "taken.png" / "sub")
    _one_line_error(code, err, "taken.png", "is a file")
    code, _, err = cli("downscale", tiny / "hr", tiny / "taken.png")
    _one_line_error(code, err, "taken.png", "must be a folder")


def test_unknown_arch_lists_the_variants(tiny, cli):
    code, _, err = cli("eval", "--weights", tiny / "w.pth", "--arch", "bogus", "--hr", tiny / "hr", "--device", "cpu")
    last = _one_line_error(code, err, "--arch bogus", "unknown variant", "rfdn_tiny", "dat_s", "swinir_m_s48")
    assert "KeyError" not in last


def test_truncated_checkpoint_gives_the_reason(tiny, cli):
    blob = (tiny / "w.pth").read_bytes()
    (tiny / "cut.pth").write_bytes(blob[: len(blob) // 2])
    code, _, err = cli("upscale", "--weights", tiny / "cut.pth", tiny / "lr", "-o", tiny / "out", "--device", "cpu")
    last = _one_line_error(code, err, "cut.pth", "not a readable torch checkpoint",
                           "truncated or corrupt zip archive")
    assert "()" not in last


@pytest.mark.parametrize("command", ["eval", "upscale", "downscale"])
def test_one_bad_image_stops_before_any_work(tiny, cli, monkeypatch, command):
    # The policy of every command: all inputs are read first; one bad file stops it, named, with nothing done.
    folder = "lr" if command == "upscale" else "hr"
    (tiny / folder / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    if command == "eval":
        (tiny / "lr" / "zzx4.png").write_bytes((tiny / "lr" / "ax4.png").read_bytes())
    refuse_model_load(monkeypatch)
    args = {"eval": ["eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--lr", tiny / "lr",
                     "--device", "cpu", "--json", tiny / "out" / "r.json"],
            "upscale": ["upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "out", "--device", "cpu"],
            "downscale": ["downscale", tiny / "hr", tiny / "out"]}[command]
    code, out, err = cli(*args)
    _one_line_error(code, err, "zz.png", "not a readable image")
    assert out == "" and not (tiny / "out").exists()


def test_eval_checks_lr_sizes_before_the_model(tiny, cli, monkeypatch):
    cv2.imwrite(str(tiny / "lr" / "bx4.png"), np.zeros((15, 16, 3), np.uint8))
    refuse_model_load(monkeypatch)
    code, _, err = cli("eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--lr", tiny / "lr", "--device", "cpu")
    _one_line_error(code, err, "bx4.png", "does not match")


def test_good_inputs_still_run(tiny, cli):
    code, out, _ = cli("eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--lr", tiny / "lr",
                       "--device", "cpu", "--json", tiny / "r.json")
    assert code == 0 and out.startswith(f"| Model | {tiny.name} (2) |") and len(_one_set(tiny / "r.json")["images"]) == 2
    code, _, _ = cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "sr", "--device", "cpu")
    assert code == 0 and sorted(p.name for p in (tiny / "sr").iterdir()) == ["a.png", "b.png"]
    assert cv2.imread(str(tiny / "sr" / "a.png")).shape == (64, 64, 3)
    code, _, _ = cli("downscale", tiny / "hr", tiny / "down")
    assert code == 0 and sorted(p.name for p in (tiny / "down").iterdir()) == ["ax4.png", "bx4.png"]


def test_input_too_small_for_the_model_is_one_line(tiny, cli):
    cv2.imwrite(str(tiny / "small.png"), np.zeros((8, 8, 3), np.uint8))  # RFDN needs sides >= 15
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "small.png", "-o", tiny / "sr", "--device", "cpu")
    _one_line_error(code, err, "small.png", "LR image 8x8", "rfdn_tiny", "at least 15 px")
    assert not (tiny / "sr").exists()
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "sr", "--tile", "0")
    _one_line_error(code, err, "--tile 0")


def test_upscale_refuses_two_inputs_with_one_output_name(tiny, cli):
    (tiny / "lr" / "a.png").write_bytes((tiny / "lr" / "ax4.png").read_bytes())  # a.png and ax4.png -> a.png
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "sr", "--device", "cpu")
    _one_line_error(code, err, "a.png")
    assert not (tiny / "sr").exists()


# ------------------------------------------------------- all or nothing: every check before the first forward or write


def _tree(folder):
    """Every entry under ``folder``, hidden ones included (so a leftover temporary file shows); None if absent."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


def _no_forward(monkeypatch):
    """Fail the test if the command runs the model on any image before every input was checked."""
    def refuse(*_, **__):
        raise AssertionError("the model ran before every input was checked")
    monkeypatch.setattr("srmodels.cli._sr", refuse)


def test_upscale_checks_every_size_before_writing_anything(tiny, cli, monkeypatch):
    # A good 72x72 image comes first: nothing may be written when the 10x10 one after it is refused.
    rng = np.random.default_rng(1)
    (tiny / "mixed").mkdir()
    cv2.imwrite(str(tiny / "mixed" / "a_good.png"), rng.integers(0, 256, (72, 72, 3), dtype=np.uint8))
    cv2.imwrite(str(tiny / "mixed" / "b_small.png"), rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    _no_forward(monkeypatch)
    code, out, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "mixed", "-o", tiny / "out", "--device", "cpu")
    last = _one_line_error(code, err, "b_small.png", "LR image 10x10", "rfdn_tiny", "at least 15 px")
    assert "a_good.png" not in last and out == "" and not (tiny / "out").exists()
    (tiny / "kept").mkdir()
    (tiny / "kept" / "a_good.png").write_bytes(b"the user's file")
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "mixed", "-o", tiny / "kept", "--device", "cpu")
    _one_line_error(code, err, "b_small.png")
    assert _tree(tiny / "kept") == ["a_good.png"] and (tiny / "kept" / "a_good.png").read_bytes() == b"the user's file"


def test_eval_checks_every_size_before_any_forward(tiny, cli, monkeypatch):
    cv2.imwrite(str(tiny / "hr" / "c.png"), np.zeros((40, 64, 3), np.uint8))  # its LR, 16x10, is under RFDN's 15
    _no_forward(monkeypatch)
    code, out, err = cli("eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--device", "cpu",
                         "--json", tiny / "res" / "r.json")
    _one_line_error(code, err, "c.png", "LR image 16x10", "rfdn_tiny", "at least 15 px")
    assert out == "" and not (tiny / "res").exists()
    cv2.imwrite(str(tiny / "lr" / "cx4.png"), np.zeros((10, 16, 3), np.uint8))  # a given LR is the file named
    code, out, err = cli("eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--lr", tiny / "lr",
                         "--device", "cpu", "--json", tiny / "res" / "r.json")
    _one_line_error(code, err, "cx4.png", "LR image 16x10", "at least 15 px")
    assert out == "" and not (tiny / "res").exists()


def test_swinir_window_padding_limit_is_one_line(tmp_path, cli, monkeypatch):
    # SwinIR reflect-pads each side to a multiple of its window (8), which a side of 4 or less cannot give: this
    # was torch's traceback from F.pad.
    from srmodels.models.checkpoint import save_checkpoint
    from srmodels.models.model import build_model

    model = build_model("swinir_tiny")
    save_checkpoint(tmp_path / "w.pth", model.net.state_dict(), **model.describe())
    cv2.imwrite(str(tmp_path / "thin.png"), np.zeros((4, 40, 3), np.uint8))
    _no_forward(monkeypatch)
    code, _, err = cli("upscale", "--weights", tmp_path / "w.pth", tmp_path / "thin.png", "-o", tmp_path / "out",
                       "--device", "cpu")
    _one_line_error(code, err, "thin.png", "LR image 40x4", "swinir_tiny", "at least 5 px")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "upscale"])
def test_tile_under_the_model_limit_names_the_option(tiny, cli, monkeypatch, command):
    _no_forward(monkeypatch)
    args = {"eval": ["eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--lr", tiny / "lr",
                     "--json", tiny / "out" / "r.json"],
            "upscale": ["upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "out"]}[command]
    code, out, err = cli(*args, "--device", "cpu", "--tile", "8", "--tile-overlap", "0")
    last = _one_line_error(code, err, "--tile 8", "--tile-overlap 0", "8x8", "rfdn_tiny", "at least 15 px",
                           "use --tile 15 or more")
    assert ".png" not in last and out == "" and not (tiny / "out").exists()


def test_tile_with_enough_overlap_runs(tiny, cli):
    # Each tile runs with its overlap around it: --tile 8 and the default overlap 16 give RFDN 40-pixel windows.
    cv2.imwrite(str(tiny / "big.png"), np.random.default_rng(2).integers(0, 256, (44, 40, 3), dtype=np.uint8))
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "big.png", "-o", tiny / "sr", "--tile", "8",
                       "--device", "cpu")
    assert code == 0, err
    assert _tree(tiny / "sr") == ["big.png"] and cv2.imread(str(tiny / "sr" / "big.png")).shape == (176, 160, 3)


@pytest.mark.parametrize("case", ["upscale", "upscale-new-folder", "eval-json", "eval-table"])
def test_unwritable_output_is_one_line_before_any_work(tiny, cli, monkeypatch, read_only_folder, case):
    ro = read_only_folder
    refuse_model_load(monkeypatch)
    args = {"upscale": ["upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", ro],
            "upscale-new-folder": ["upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", ro / "sr"],
            "eval-json": ["eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--json", ro / "r.json"],
            "eval-table": ["eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--json", tiny / "res" / "r.json",
                           "--table", ro / "t.md"]}[case]
    code, out, err = cli(*args, "--device", "cpu")
    _one_line_error(code, err, f"{ro}: cannot write", "Permission denied")
    assert out == "" and _tree(ro) == [] and not (tiny / "res").exists()


def test_eval_json_and_table_on_one_file(tiny, cli, monkeypatch):
    refuse_model_load(monkeypatch)
    code, _, err = cli("eval", "--weights", tiny / "w.pth", "--hr", tiny / "hr", "--json", tiny / "r.md",
                       "--table", tiny / "r.md", "--device", "cpu")
    _one_line_error(code, err, "--json", "--table", "the same file")


def test_upscale_failing_midway_leaves_nothing_new(tiny, cli, monkeypatch):
    """An unexpected failure after the first image (here a simulated one) leaves the output folder as it was."""
    from srmodels import cli as cli_module

    real_sr, calls = cli_module._sr, []

    def second_fails(model, lr, args, device, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real_sr(model, lr, args, device, path)

    monkeypatch.setattr("srmodels.cli._sr", second_fails)
    (tiny / "sr").mkdir()
    (tiny / "sr" / "a.png").write_bytes(b"the user's file")
    with pytest.raises(RuntimeError, match="simulated"):
        cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "sr", "--device", "cpu")
    assert calls == ["ax4.png", "bx4.png"]  # the first image was done when the second failed
    assert _tree(tiny / "sr") == ["a.png"] and (tiny / "sr" / "a.png").read_bytes() == b"the user's file"
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "new" / "sr", "--device", "cpu")
    assert not (tiny / "new").exists()  # the folders it made are gone again
    monkeypatch.setattr("srmodels.cli._sr", real_sr)
    code, _, err = cli("upscale", "--weights", tiny / "w.pth", tiny / "lr", "-o", tiny / "sr", "--device", "cpu")
    assert code == 0, err
    assert _tree(tiny / "sr") == ["a.png", "b.png"] and cv2.imread(str(tiny / "sr" / "a.png")).shape == (64, 64, 3)


def test_debug_shows_the_traceback(tiny, cli, monkeypatch):
    from srmodels.data.images import ImageError

    (tiny / "hr" / "zz.png").write_bytes(b"garbage")
    args = ["downscale", tiny / "hr", tiny / "out"]
    with pytest.raises(ImageError, match="zz.png"):
        cli("--debug", *args)
    with pytest.raises(ImageError, match="zz.png"):
        cli(*args, "--debug")
    monkeypatch.setenv("SRMODELS_DEBUG", "1")
    with pytest.raises(ImageError, match="zz.png"):
        cli(*args)
    monkeypatch.setenv("SRMODELS_DEBUG", "0")
    code, _, err = cli(*args)
    _one_line_error(code, err, "zz.png")


# ------------------------------------------------------------------------------------------------ compare-metrics


def _metrics_files(tmp_path, old, new):
    a, b = tmp_path / "old.json", tmp_path / "new.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    return a, b


def test_compare_metrics_is_exact_by_default(tmp_path, cli):
    old = {"sets": {"test": {"fusion": {"psnr_y": 33.0918, "ssim_y": 0.8473}, "num_images": 3}}}
    new = copy.deepcopy(old)
    new["sets"]["test"]["fusion"]["psnr_y"] = 33.091800000001
    code, out, _ = cli("compare-metrics", *_metrics_files(tmp_path, old, new))
    lines = out.strip().splitlines()
    assert code == 1
    assert lines[0] == ("MOVED sets.test.fusion.psnr_y: 33.0918 -> 33.091800000001 "
                        f"(diff {33.091800000001 - 33.0918:+})")
    assert lines[-1] == "compare-metrics: 3 metrics compared, 1 moved"
    code, out, _ = cli("compare-metrics", *_metrics_files(tmp_path, old, old))
    assert code == 0 and out.strip() == "compare-metrics: 3 metrics compared, 0 moved"


def test_compare_metrics_every_leaf(tmp_path, cli):
    old = {"protocol": {"primary": "y", "crop_border": 4}, "sets": {"test": {"num_images": 3, "dat": {"psnr_y": 1.0}}},
           "curve": [0.5, 0.25], "train_s": 10, "nan": float("nan")}
    new = {"protocol": {"primary": "rgb", "crop_border": 4}, "sets": {"test": {"num_images": 4, "rfdn": {"psnr_y": 2}}},
           "curve": [0.5, 0.125], "train_s": 10.0, "nan": float("nan")}
    code, out, _ = cli("compare-metrics", *_metrics_files(tmp_path, old, new), "--tol-db", "5", "--tol-ssim", "1")
    lines = out.strip().splitlines()
    assert code == 1
    # Tolerances apply to PSNR / SSIM keys only; every other number must match exactly (10 == 10.0 does).
    assert "MOVED curve.1: 0.25 -> 0.125 (diff -0.125)" in lines
    assert "MOVED sets.test.num_images: 3 -> 4 (diff +1)" in lines
    assert "CHANGED protocol.primary: 'y' -> 'rgb'" in lines
    assert "ONLY IN OLD sets.test.dat.psnr_y = 1.0" in lines
    assert "ONLY IN NEW sets.test.rfdn.psnr_y = 2" in lines
    assert lines[-1] == ("compare-metrics: 6 metrics compared, 2 moved, 1 other value changed, "
                         "2 only in one file")


def test_compare_metrics_tolerance_options(tmp_path, cli):
    old = {"m": {"psnr_y": 30.0, "ssim_y": 0.9}}
    new = {"m": {"psnr_y": 30.005, "ssim_y": 0.9005}}
    files = _metrics_files(tmp_path, old, new)
    assert cli("compare-metrics", *files, "--tol-db", "0.01", "--tol-ssim", "0.001")[0] == 0
    code, out, _ = cli("compare-metrics", *files, "--tol-db", "0.01")
    assert code == 1 and "MOVED m.ssim_y: 0.9 -> 0.9005" in out and "psnr_y" not in out


def test_compare_metrics_unreadable_file_is_one_line(tmp_path, cli):
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = cli("compare-metrics", tmp_path / "bad.json", tmp_path / "bad.json")
    _one_line_error(code, err, "bad.json", "not valid JSON")
    code, _, err = cli("compare-metrics", tmp_path / "bad.json", tmp_path / "none.json")
    _one_line_error(code, err)
