"""EMA fine-tuning (``TrainConfig.ema_decay``, ``backbones.<b>.ema_decay``) on tiny synthetic data (CPU, seconds):
the average itself, that validation, selection and best.pth use it, exact resume, and decay 0 = the run as it was.
"""
from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from srmodels.core import isa
from srmodels.training import ema as training_module
from srmodels.models.checkpoint import checkpoint_meta, read_checkpoint
from srmodels.core.errors import UserError
from srmodels.training.finetune import backbone_predictor
from srmodels.models.model import build_model, load_model
from srmodels.training.ema import WeightsEma, _holding
from srmodels.training.loop import ConfigError, evaluate

from .helpers import FINETUNE_CONFIG, ROOT, resume_file, run_finetune

DECAY = 0.75  # short runs: a decay this low moves the average measurably within the 4 steps of a test run


# sr_data (conftest) and run_finetune (helpers): test_train's tiny fine-tune of rfdn_tiny, here with ema_decay.


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def score(sr_data: dict, weights: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Validation PSNR of rfdn_tiny holding ``weights``, as the training loop scores it."""
    model = build_model("rfdn_tiny")
    model.net.load_state_dict(weights)
    return evaluate(backbone_predictor(model), sr_data["val"], FINETUNE_CONFIG.crop_border)


@pytest.fixture(scope="module")
def ema_run(sr_data, tmp_path_factory) -> tuple[dict, nn.Module, Path]:
    out = tmp_path_factory.mktemp("ema") / "out"
    metrics, model = run_finetune(sr_data, out, ema_decay=DECAY)
    return metrics, model, out


# ------------------------------------------------------------------------------------------------ the average

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)


def test_average_is_the_usual_formula_and_buffers_are_copied():
    """ema = d * ema + (1 - d) * w after every update, from the initial weights; buffers follow the module.
    Values and decay are dyadic, so float32 is exact and the float64 reference must match bit for bit."""
    module = Tiny()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p))
    ema = WeightsEma(module, DECAY)
    reference = {k: v.double().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
    assert ema.averaged == ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    assert set(ema.copied) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for step in range(1, 4):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.5 * step)  # what an optimizer step does: in place
            module.bn.running_mean.fill_(step)
            module.bn.num_batches_tracked += 1
        ema.update(module)
        for key in ema.averaged:
            reference[key] = DECAY * reference[key] + (1 - DECAY) * module.state_dict()[key].double()
            assert torch.equal(ema.tensors[key].double(), reference[key]), (step, key)
        for key in ema.copied:
            assert torch.equal(ema.tensors[key], module.state_dict()[key]), (step, key)
    assert ema.tensors["bn.num_batches_tracked"].item() == 3
    assert not torch.equal(ema.tensors["conv.weight"], module.conv.weight.detach())  # a copy, not the weights
    saved = ema.state()
    again = WeightsEma(Tiny(), DECAY)
    again.load(saved)
    assert same(again.tensors, ema.tensors)


def test_holding_swaps_weights_in_place_and_back_exactly():
    module, other = Tiny(), Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = list(module.parameters())
    with _holding(module, other.state_dict()):
        assert same(module.state_dict(), other.state_dict())
    assert same(module.state_dict(), before)
    assert all(a is b for a, b in zip(params, module.parameters()))  # the optimizer's tensors are still the ones
    with pytest.raises(RuntimeError), _holding(module, other.state_dict()):
        raise RuntimeError("a validation that fails")
    assert same(module.state_dict(), before)


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_decay_is_checked(decay):
    with pytest.raises(ConfigError, match="ema_decay: must be in") as err:
        replace(FINETUNE_CONFIG, ema_decay=decay)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------- in the training loop

def test_validation_selection_and_best_pth_use_the_average(sr_data, ema_run):
    metrics, model, out = ema_run
    assert metrics["ema_decay"] == DECAY and metrics["steps"] == 4
    raw_ckpt = read_checkpoint(out / "best.pth")
    assert set(raw_ckpt) == {"format", "meta", "state_dict", "params_ema", "params"}
    assert checkpoint_meta(raw_ckpt)["ema_decay"] == DECAY
    ema_weights, raw_weights = raw_ckpt["params_ema"], raw_ckpt["params"]
    # Loaders that read state_dict first (spandrel, chaiNNer) get the average too.
    assert same(raw_ckpt["state_dict"], ema_weights) and not same(ema_weights, raw_weights)
    # Our loader takes params_ema, and what it loads scores exactly the reported best.
    assert same(load_model(out / "best.pth").net.state_dict(), ema_weights)
    assert score(sr_data, ema_weights) == (metrics["best_val_psnr"], metrics["best_per_image"])
    assert score(sr_data, raw_weights)[0] != metrics["best_val_psnr"]
    # Every epoch's validation is the average's: the last one scores the final average, not the final weights.
    rows = list(csv.DictReader((out / "curve.csv").open()))
    state = torch.load(resume_file(out), weights_only=True)
    final_ema, final_raw = state["ema"], model.net.state_dict()
    assert same(state["model"], final_raw) and not same(final_ema, final_raw)
    assert float(rows[-1]["val_psnr"]) == metrics["final_val_psnr"] == score(sr_data, final_ema)[0]
    assert score(sr_data, final_raw)[0] != metrics["final_val_psnr"]
    # Epoch 0 validates the initial weights, where the average starts.
    torch.manual_seed(0)
    assert float(rows[0]["val_psnr"]) == score(sr_data, build_model("rfdn_tiny").net.state_dict())[0]


def test_average_is_updated_after_every_optimizer_step(sr_data, tmp_path, monkeypatch):
    seen = []
    update = WeightsEma.update

    def spy(self: WeightsEma, module: nn.Module) -> None:
        seen.append({k: v.clone() for k, v in module.state_dict().items()})
        update(self, module)

    monkeypatch.setattr(training_module.WeightsEma, "update", spy)
    metrics, model = run_finetune(sr_data, tmp_path / "out", ema_decay=DECAY)
    assert len(seen) == metrics["steps"] == 4
    assert not any(same(a, b) for a, b in zip(seen, seen[1:]))  # each time after a step: new weights
    assert same(seen[-1], model.net.state_dict())  # the last one after the last step


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_ema_resume_after_interruption_matches_straight_run(sr_data, tmp_path, schedule):
    """Weights, average, best.pth (both sets), curve and metrics of an interrupted and resumed EMA run are
    those of an uninterrupted one, bit for bit."""
    settings = {"schedule": schedule, "milestones": (1,), "ema_decay": DECAY}
    straight_metrics, straight_model = run_finetune(sr_data, tmp_path / "straight", **settings)

    def interrupt(metrics: dict, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(sr_data, tmp_path / "run", log_metrics=interrupt, **settings)
    assert "ema" in torch.load(resume_file(tmp_path / "run"), weights_only=True)
    metrics, model = run_finetune(sr_data, tmp_path / "run", **settings)
    assert metrics["timing"]["resumed_from_epoch"] == 1
    assert same(model.state_dict(), straight_model.state_dict())
    a, b = (torch.load(resume_file(tmp_path / d), weights_only=True) for d in ("straight", "run"))
    assert same(a["ema"], b["ema"]) and same(a["model"], b["model"])
    a, b = (read_checkpoint(tmp_path / d / "best.pth") for d in ("straight", "run"))
    assert all(same(a[k], b[k]) for k in ("state_dict", "params_ema", "params"))
    straight_metrics.pop("timing"), metrics.pop("timing")
    assert metrics == straight_metrics
    assert (tmp_path / "run" / "curve.csv").read_bytes() == (tmp_path / "straight" / "curve.csv").read_bytes()


def test_resume_into_a_fresh_folder_restores_both_weight_sets(sr_data, ema_run, tmp_path):
    """The stage after an interruption: a new staging folder gets best.pth back from the resume state."""
    metrics, _, out = ema_run
    (tmp_path / "b.resume.pth").write_bytes(resume_file(out).read_bytes())
    again, _ = run_finetune(sr_data, tmp_path / "b", ema_decay=DECAY)
    assert again["timing"]["resumed_from_epoch"] == 2 and again["best_val_psnr"] == metrics["best_val_psnr"]
    a, b = read_checkpoint(out / "best.pth"), read_checkpoint(tmp_path / "b" / "best.pth")
    assert set(a) == set(b) and all(same(a[k], b[k]) for k in ("state_dict", "params_ema", "params"))
    assert (out / "curve.csv").read_bytes() == (tmp_path / "b" / "curve.csv").read_bytes()


def test_short_run_with_a_long_average_warns(sr_data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="srmodels.training.loop"):
        run_finetune(sr_data, tmp_path / "long", epochs=1, ema_decay=0.999)
    assert "ema_decay 0.999 averages over about 1000 steps and this run has 2: the final average still gives " \
           "the initial weights 100% of its weight" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="srmodels.training.loop"):
        run_finetune(sr_data, tmp_path / "short", epochs=1, ema_decay=0.1)  # 0.1 ** 2 = 1%: the start is forgotten
    assert "ema_decay" not in caplog.text


def test_resume_state_of_another_decay_is_not_used(sr_data, tmp_path, caplog):
    run_finetune(sr_data, tmp_path / "out", epochs=1)  # no EMA
    with caplog.at_level(logging.WARNING, logger="srmodels.training.loop"):
        metrics, _ = run_finetune(sr_data, tmp_path / "out", epochs=1, ema_decay=DECAY)
    assert metrics["timing"]["resumed_from_epoch"] == 0 and "another configuration (ema_decay differ)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="srmodels.training.loop"):
        metrics, _ = run_finetune(sr_data, tmp_path / "out", epochs=1, ema_decay=0.5)
    assert metrics["timing"]["resumed_from_epoch"] == 0 and "ema_decay differ" in caplog.text


# ------------------------------------------------------------------------------------- decay 0: the run as it was

def test_decay_0_adds_nothing(sr_data, tmp_path):
    """Off, nothing of EMA shows: no metric, no checkpoint key, no meta field, nothing in the resume state."""
    metrics, _ = run_finetune(sr_data, tmp_path / "out", ema_decay=0.0)
    ckpt = read_checkpoint(tmp_path / "out" / "best.pth")
    assert set(ckpt) == {"format", "meta", "state_dict"} and "ema_decay" not in checkpoint_meta(ckpt)
    assert "ema_decay" not in metrics
    state = torch.load(resume_file(tmp_path / "out"), weights_only=True)
    assert "ema" not in state and "raw" not in state["best"] and "ema_decay" not in state["config"]


# A tiny fine-tune under the avx2 pin; prints a hash of its metrics, best.pth (keys, meta, tensors) and curve.csv.
BEFORE_EMA_PROBE = r"""
import sys
sys.path.insert(0, {root!r})
from srmodels.core import isa
isa.pin("avx2")
import hashlib, json, tempfile
from pathlib import Path
import numpy as np
import torch
from srmodels.data.datasets import PairedPatches, list_pairs
from srmodels.training.finetune import BETAS, finetune
from srmodels.models.model import build_model
from srmodels.training.loop import TrainConfig
from tests.helpers import SCALE, write_sr_data

settings = json.loads(sys.argv[1])
root = Path(tempfile.mkdtemp())
data = write_sr_data(root)  # test_train's sr_data, the same images
train, val = data["train"], data["val"]
torch.manual_seed(0)
config = TrainConfig(epochs=2, batch=4, lr=1e-3, crop_border=4, seed=0, betas=BETAS, threads=1, **settings)
metrics = finetune(build_model("rfdn_tiny"), PairedPatches(*train, lr_patch=16, scale=SCALE, seed=0), val, config,
                   root / "out")
metrics.pop("timing")
ckpt = torch.load(root / "out" / "best.pth", weights_only=True)
digest = hashlib.sha256(json.dumps([metrics, sorted(ckpt), ckpt["meta"]], sort_keys=True).encode())
for key, tensor in ckpt["state_dict"].items():
    digest.update(key.encode())
    digest.update(tensor.numpy().tobytes())
digest.update((root / "out" / "curve.csv").read_bytes())
print(digest.hexdigest())
"""
# What the probe gave with settings {} at commit b1f1722 (training code without EMA), under the avx2 pin, by CPU
# vendor (the pin does not make AMD and Intel CPUs round alike: docs/reproducibility.md).
BEFORE_EMA_DIGESTS = {"AuthenticAMD": "802fd3b919d00a5c80c34344dddd6aeb80daf5c9e159e21845625bad74091c05",
                      "GenuineIntel": "271177a68b0fb15cd7014b14f8d2fad778da46897c6f1da386d1b910090fb843"}


@pytest.mark.skipif("avx2" not in isa.cpu_flags() or "fma" not in isa.cpu_flags(),
                    reason="this CPU has no AVX2/FMA: the avx2 pin cannot run here")
def test_decay_0_gives_the_results_of_before_ema():
    out = subprocess.run([sys.executable, "-c", BEFORE_EMA_PROBE.format(root=str(ROOT)), '{"ema_decay": 0.0}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **isa.environment("native")})
    assert out.returncode == 0, out.stderr[-2000:]
    digest = out.stdout.split()[-1]
    if isa.cpu_vendor() not in BEFORE_EMA_DIGESTS:
        pytest.skip(f"no digest recorded for {isa.cpu_vendor()} CPUs ({isa.cpu_model()}): this one gives {digest}")
    assert digest == BEFORE_EMA_DIGESTS[isa.cpu_vendor()]
