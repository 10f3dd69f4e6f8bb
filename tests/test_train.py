"""The training loop (``srmodels.training.fit``) through backbone fine-tuning, on tiny synthetic data (CPU, seconds).

Fusion training runs the same loop; its own checks are in test_fusion.py.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from srmodels.training import finetune as finetune_module
from srmodels.models.accelerate import accelerate
from srmodels.models.caching import cache_outputs
from srmodels.models.checkpoint import checkpoint_meta, load_into, load_state_dict, read_checkpoint
from srmodels.data.datasets import PairedPatches, list_pairs, read_pair
from srmodels.core.errors import UserError
from srmodels.training.finetune import backbone_predictor, finetune
from srmodels.data.images import ImageError, to_tensor
from srmodels.models.model import build_model, load_model, min_input_size
from srmodels.training.loop import ConfigError, TrainConfig, evaluate

from .helpers import FINETUNE_CONFIG, ROOT, SCALE, resume_file, run_finetune, smooth_image, write_split

# sr_data (conftest): eight 80x80 training patches, two 64x64 validation images; run_finetune (helpers): a tiny
# fine-tune of rfdn_tiny on them (FINETUNE_CONFIG with overrides), its resume state beside its output folder, as
# the stage keeps it.


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def straight(sr_data, tmp_path_factory) -> tuple[dict, torch.nn.Module, Path]:
    out = tmp_path_factory.mktemp("straight")
    logged = []
    metrics, model = run_finetune(sr_data, out, log_metrics=lambda m, epoch: logged.append((epoch, m)))
    return metrics, model, out, logged


def test_finetune_validates_epoch_0_and_writes_outputs(sr_data, straight):
    metrics, _, out, logged = straight
    # The outputs are results only: the resume state lives elsewhere, wall-clock figures in ``timing``.
    assert {p.name for p in out.iterdir()} == {"best.pth", "curve.csv"} and resume_file(out).is_file()
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "val_psnr", "lr"]
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and rows[0]["train_loss"] == ""
    assert float(rows[2]["train_loss"]) < float(rows[1]["train_loss"])
    assert metrics["initial_val_psnr"] == float(rows[0]["val_psnr"])
    assert metrics["epochs"] == 2 and metrics["steps"] == 4 and metrics["timing"]["resumed_from_epoch"] == 0
    assert metrics["timing"]["samples_per_second"] > 0 and len(metrics["timing"]["epoch_seconds"]) == 2
    assert not any("second" in k for k in metrics)
    assert metrics["best_val_psnr"] == max(float(r["val_psnr"]) for r in rows)
    # The callback saw epoch 0 (validation only) and every epoch.
    assert [e for e, _ in logged] == [0, 1, 2] and set(logged[0][1]) == {"val_psnr"}
    assert set(logged[1][1]) == {"train_loss", "val_psnr", "lr", "epoch_seconds"}
    # best.pth rebuilds itself and scores what was reported.
    best = load_model(out / "best.pth")
    assert checkpoint_meta(read_checkpoint(out / "best.pth"))["epoch"] == metrics["best_epoch"]
    psnr, per_image = evaluate(backbone_predictor(best), sr_data["val"], 4)
    assert psnr == metrics["best_val_psnr"] and per_image == metrics["best_per_image"]


def test_initial_model_can_be_best(sr_data, straight, tmp_path):
    """A pretrained start that training only spoils: epoch 0 stays best and best.pth keeps its weights."""
    straight_out = straight[2]
    model = load_model(straight_out / "best.pth")
    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    metrics = finetune(model, train, sr_data["val"], replace(FINETUNE_CONFIG, epochs=1, lr=0.5), tmp_path)
    assert metrics["best_epoch"] == 0 and not metrics["improved"]
    assert metrics["final_val_psnr"] < metrics["initial_val_psnr"] == metrics["best_val_psnr"]
    assert same_weights(load_model(tmp_path / "best.pth"), load_model(straight_out / "best.pth"))


def test_validation_scores_an_accelerated_copy(sr_data, tmp_path, monkeypatch):
    """Validation runs the inference model the cache stage runs; training never sees accelerated layers."""
    seen = []

    def spy(module):
        seen.append((module, module.training))
        return module

    monkeypatch.setattr(finetune_module, "accelerate", spy)
    _, model = run_finetune(sr_data, tmp_path, resume=False, epochs=1)
    assert len(seen) == 2  # epoch 0 and epoch 1
    assert all(m is not model and not training for m, training in seen)
    assert same_weights(seen[-1][0], model)  # a copy of the weights just trained


def test_same_seed_same_weights(sr_data, straight, tmp_path):
    _, again = run_finetune(sr_data, tmp_path)
    assert same_weights(straight[1], again)


def test_resume_extends_a_finished_run(sr_data, straight, tmp_path):
    run_finetune(sr_data, tmp_path, epochs=1)
    metrics, model = run_finetune(sr_data, tmp_path)
    assert metrics["timing"]["resumed_from_epoch"] == 1
    assert same_weights(model, straight[1])
    assert (tmp_path / "curve.csv").read_bytes() == (straight[2] / "curve.csv").read_bytes()


def test_resume_into_a_fresh_folder_restores_the_outputs(sr_data, tmp_path):
    # What the stage does after an interruption: its outputs go to a new staging folder, the resume state stays.
    first, _ = run_finetune(sr_data, tmp_path / "a")
    best_before = torch.load(tmp_path / "a" / "best.pth", weights_only=True)["state_dict"]
    resume_file(tmp_path / "a").rename(resume_file(tmp_path / "b"))
    again, _ = run_finetune(sr_data, tmp_path / "b")
    assert again["timing"]["resumed_from_epoch"] == 2 and again["best_val_psnr"] == first["best_val_psnr"]
    best_after = torch.load(tmp_path / "b" / "best.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(best_before[k], best_after[k]) for k in best_before)
    assert (tmp_path / "a" / "curve.csv").read_bytes() == (tmp_path / "b" / "curve.csv").read_bytes()


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_finetune_resume_after_interruption_matches_straight_run(sr_data, tmp_path, schedule):
    settings = {"schedule": schedule, "milestones": (1,)}
    straight_metrics, straight_model = run_finetune(sr_data, tmp_path / "straight", **settings)

    def interrupt(metrics: dict, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(sr_data, tmp_path / "run", log_metrics=interrupt, **settings)
    metrics, model = run_finetune(sr_data, tmp_path / "run", **settings)
    assert metrics["timing"]["resumed_from_epoch"] == 1
    assert same_weights(model, straight_model)
    straight_metrics.pop("timing"), metrics.pop("timing")
    assert metrics == straight_metrics
    assert (tmp_path / "run" / "curve.csv").read_bytes() == (tmp_path / "straight" / "curve.csv").read_bytes()


def test_resume_with_other_config_starts_fresh(sr_data, tmp_path, caplog):
    run_finetune(sr_data, tmp_path, epochs=1)
    with caplog.at_level(logging.WARNING, logger="srmodels.training.loop"):
        metrics, _ = run_finetune(sr_data, tmp_path, epochs=1, lr=5e-4)
    assert metrics["timing"]["resumed_from_epoch"] == 0
    assert "another configuration (lr differ)" in caplog.text


@pytest.mark.parametrize("settings, message", [
    ({"schedule": "linear"}, "schedule: unknown 'linear'"),
    ({"epochs": -1}, "epochs: must be >= 0"),
    ({"batch": 0}, "batch: must be >= 1, got 0"),
    ({"lr": 0.0}, "lr: must be > 0, got 0.0"),
    ({"gamma": 0.0}, "gamma: must be > 0, got 0.0"),
    ({"milestones": [0, 3]}, "milestones: epochs, each >= 1"),
    ({"threads": 0}, "threads: must be >= 1, got 0"),
    ({"crop_border": -1}, "crop_border: must be >= 0, got -1"),
])
def test_config_is_checked(settings, message):
    with pytest.raises(ConfigError, match=message) as err:
        replace(FINETUNE_CONFIG, **settings)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_config_takes_params_lists_and_stays_hashable():
    config = TrainConfig(epochs=1, batch=2, lr=1e-3, crop_border=4, milestones=[2, 4], betas=[0.9, 0.99])
    assert config.milestones == (2, 4) and config.betas == (0.9, 0.99) and hash(config) == hash(replace(config))


def test_evaluate_scores_each_item(sr_data):
    def nearest(item):
        hr, lr = read_pair(item[0], item[1], SCALE)
        return item[0].stem, hr, torch.nn.functional.interpolate(to_tensor(lr), scale_factor=SCALE, mode="nearest")

    psnr, per_image = evaluate(nearest, sr_data["val"], crop_border=4)
    assert set(per_image) == {"v0", "v1"} and 15 < psnr < 60
    assert psnr == pytest.approx(np.mean(list(per_image.values())))


def test_compile_wraps_the_training_forward_only(sr_data, tmp_path, monkeypatch):
    # Real compilation takes minutes on 2 cores; what matters here is where the compiled callable is used.
    compiled = []

    def fake_compile(module):
        def forward(*args):
            compiled.append(args[0].shape)
            return module(*args)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    metrics, model = run_finetune(sr_data, tmp_path, resume=False, epochs=1, compile=True)
    assert len(compiled) == metrics["steps"] == 2 and all(s[-1] == 16 for s in compiled)  # patches, not val
    assert load_model(tmp_path / "best.pth").net.state_dict().keys() == model.net.state_dict().keys()


def test_backbone_training_does_not_import_fusion():
    """finetune@<b> must not depend on the fusion net (dvc.yaml): editing it would re-train every backbone."""
    code = "import sys, srmodels.training.finetune; print(sorted(m for m in sys.modules if m.startswith('srmodels.models.fusion')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=300)
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------- epochs 0: the pretrained weights, as they are

def released_weights(path: Path) -> dict:
    """A released-style rfdn_tiny checkpoint (a bare state dict, as RFDN_AIM.pth), unlike run_finetune's init."""
    torch.manual_seed(1)
    state = build_model("rfdn_tiny").net.state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("settings", [{}, {"schedule": "cosine"}, {"schedule": "multistep", "milestones": (1,)},
                                      {"ema_decay": 0.999}])
def test_epochs_0_saves_the_pretrained_weights_bit_for_bit(sr_data, tmp_path, caplog, settings):
    released = released_weights(tmp_path / "released.pth")

    def pretrained() -> torch.nn.Module:
        model = build_model("rfdn_tiny")
        load_into(model.net, load_state_dict(tmp_path / "released.pth"))  # as the stage loads `pretrained`
        return model

    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    out, resume = tmp_path / "out", tmp_path / "resume.pth"
    # A resume state left by a longer run from the same weights and settings is beyond epoch 0: not resumed.
    finetune(pretrained(), train, sr_data["val"], replace(FINETUNE_CONFIG, epochs=1, **settings), tmp_path / "x",
             resume_path=resume)
    assert resume.is_file()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="srmodels.training.loop"):
        metrics = finetune(pretrained(), train, sr_data["val"], replace(FINETUNE_CONFIG, epochs=0, **settings),
                           out, provenance={"test": True}, resume_path=resume)
    saved = torch.load(out / "best.pth", weights_only=True)
    for key in ("state_dict", *(("params", "params_ema") if settings.get("ema_decay") else ())):
        assert saved[key].keys() == released.keys(), key
        assert all(saved[key][k].dtype == v.dtype and torch.equal(saved[key][k], v) for k, v in released.items()), key
    meta = checkpoint_meta(read_checkpoint(out / "best.pth"))  # describes itself as any best.pth
    assert (meta["arch"], meta["variant"], meta["scale"], meta["epoch"], meta["step"]) == ("rfdn", "rfdn_tiny", 4, 0, 0)
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [r["epoch"] for r in rows] == ["0"] and rows[0]["train_loss"] == ""
    assert metrics["epochs"] == metrics["steps"] == metrics["best_epoch"] == 0 and not metrics["improved"]
    assert metrics["final_train_loss"] is None and metrics["timing"]["train_seconds"] == 0
    assert metrics["best_val_psnr"] == metrics["initial_val_psnr"] == metrics["final_val_psnr"]
    assert metrics["best_val_psnr"] == float(rows[0]["val_psnr"])
    psnr, _ = evaluate(backbone_predictor(load_model(out / "best.pth")), sr_data["val"], 4)
    assert psnr == metrics["best_val_psnr"]
    assert "resume.pth: " in caplog.text and "; starting fresh" in caplog.text  # (cosine: "epochs differ")
    assert "ema_decay" not in caplog.text and "no epoch beat" not in caplog.text  # nothing trained, nothing to say


def _stage(cwd: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SRMODELS_PARAMS": str(cwd / "params.yaml"),
           "MLFLOW_TRACKING_URI": "off"}
    env.pop("SRMODELS_DEBUG", None)
    try:
        return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(args)} still running after {timeout} s; its output so far: {err.stderr}")


@pytest.mark.slow  # the stage in its own process
def test_finetune_stage_with_epochs_0(sr_data, tmp_path):
    """finetune@<b> with epochs 0: validation (epoch 0), curve.csv with that row, metrics.json, and best.pth holding
    the pretrained weights; a missing pretrained file is one line naming its key."""
    from ruamel.yaml import YAML

    from srmodels.core.params import read_yaml

    prepared = tmp_path / "data" / "prepared"
    for split, (hr, lr) in {"train_patches": sr_data["train"],
                            "val": (sr_data["val"][0][0].parent, sr_data["val"][0][1].parent)}.items():
        shutil.copytree(hr, prepared / split / "hr")
        shutil.copytree(lr, prepared / split / "lr")
    (tmp_path / "inputs" / "pretrained" / "rfdn").mkdir(parents=True)
    released = released_weights(tmp_path / "inputs" / "pretrained" / "rfdn" / "released.pth")
    params = read_yaml(ROOT / "params.yaml")
    entry = {"variant": "rfdn_tiny", "epochs": 0, "pretrained": "inputs/pretrained/rfdn/released.pth", "lr_patch": 16}
    params.update(cpu_isa="native", device="cpu", threads=1, trained=["rfdn", "dat"],
                  backbones={"rfdn": entry, "dat": {"variant": "dat_tiny"}})
    params["fusion"]["members"] = ["rfdn", "dat"]
    with open(tmp_path / "params.yaml", "w") as f:
        YAML().dump(params, f)

    done = _stage(tmp_path, "stages.finetune", "rfdn")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "data" / "finetune" / "rfdn"
    assert {p.name for p in out.iterdir()} == {"best.pth", "curve.csv", "metrics.json"}
    state = torch.load(out / "best.pth", weights_only=True)["state_dict"]
    assert state.keys() == released.keys() and all(torch.equal(state[k], v) for k, v in released.items())
    assert [r["epoch"] for r in csv.DictReader((out / "curve.csv").open())] == ["0"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == metrics["steps"] == metrics["best_epoch"] == 0 and metrics["variant"] == "rfdn_tiny"

    (tmp_path / "inputs" / "pretrained" / "rfdn" / "released.pth").unlink()
    done = _stage(tmp_path, "stages.finetune", "rfdn")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("finetune@rfdn: error: backbones.rfdn.pretrained: "
                                                    "inputs/pretrained/rfdn/released.pth does not exist (the folder is "
                                                    "empty)")


# ------------------------------------------------------- inputs smaller than the architecture: one line each

@pytest.mark.parametrize("variant, smallest", [("rfdn_tiny", 15), ("swinir_tiny", 5), ("dat_tiny", 1),
                                               ("rrdbnet_tiny", 1)])
def test_min_input_size_is_what_the_architecture_accepts(variant, smallest):
    model = build_model(variant).eval()
    assert min_input_size(variant) == min_input_size(model) == min_input_size(model.net) == smallest
    assert min_input_size(accelerate(model)) == min_input_size(torch.compile(model)) == smallest
    with torch.no_grad():
        model(torch.rand(1, 3, smallest, smallest + 3))
        if smallest > 1:
            with pytest.raises((ValueError, RuntimeError)):
                model(torch.rand(1, 3, smallest - 1, smallest + 3))


def small_val_pair(root: Path, lr_size: int = 12) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(3)
    hr, lr = write_split(root, {"tiny": smooth_image(rng, lr_size * SCALE, 20 * SCALE)})
    return list_pairs(hr, lr, SCALE)


def test_too_small_validation_image_is_one_line_before_the_forward(sr_data, tmp_path):
    pairs = small_val_pair(tmp_path / "val")
    with pytest.raises(ImageError) as err:  # the architecture's own error is a plain ValueError
        backbone_predictor(build_model("rfdn_tiny"))(pairs[0])
    assert str(err.value) == (f"{pairs[0][1]}: LR image 20x12 is too small for rfdn_tiny, which needs at least "
                              "15 px on each side")
    train = PairedPatches(*sr_data["train"], lr_patch=16, scale=SCALE, seed=0)
    with pytest.raises(ImageError, match=re.escape(f"{pairs[0][1]}: LR image 20x12 is too small")):
        finetune(build_model("rfdn_tiny"), train, sr_data["val"] + pairs, replace(FINETUNE_CONFIG, epochs=1),
                 tmp_path / "o")
    assert not (tmp_path / "o" / "best.pth").exists()
    with pytest.raises(ConfigError, match=re.escape("lr_patch: 12 px crops are smaller than rfdn_tiny accepts "
                                                    "(at least 15 px on each side)")):
        finetune(build_model("rfdn_tiny"), PairedPatches(*sr_data["train"], lr_patch=12, scale=SCALE, seed=0),
                 sr_data["val"], FINETUNE_CONFIG, tmp_path / "p")


def test_too_small_image_stops_the_cache_before_any_forward(sr_data, tmp_path):
    prepared, cached = tmp_path / "prepared", tmp_path / "cache" / "rfdn"
    shutil.copytree(sr_data["val"][0][0].parent, prepared / "fusion_train" / "hr")
    shutil.copytree(sr_data["val"][0][1].parent, prepared / "fusion_train" / "lr")
    shutil.copytree(sr_data["val"][0][0].parent, prepared / "val" / "hr")
    shutil.copytree(sr_data["val"][0][1].parent, prepared / "val" / "lr")
    small = small_val_pair(prepared / "eval" / "test")[0][1]  # last in the order the cache runs
    calls = []
    model = build_model("rfdn_tiny").eval()
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ImageError) as err:
        cache_outputs(accelerate(model), prepared, cached, scale=SCALE, self_ensemble=True, tile=None,
                      tile_overlap=16, device=torch.device("cpu"))
    assert str(err.value) == (f"{small}: LR image 20x12 is too small for rfdn_tiny, which needs at least 15 px on "
                              "each side")
    assert calls == [] and not any(p.is_file() for p in tmp_path.joinpath("cache").rglob("*"))
    small.unlink()
    counts = cache_outputs(model, prepared, cached, scale=SCALE, self_ensemble=False, tile=None, tile_overlap=16,
                           device=torch.device("cpu"))
    assert counts == {"fusion_train": 2, "val": 2, "eval/test": 0} and calls
