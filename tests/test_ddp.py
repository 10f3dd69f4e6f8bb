"""DDP fine-tuning on CPU (gloo, 2 processes under torchrun) trains like one process with the same global batch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from srmodels.training import distributed
from srmodels.data.datasets import PairedPatches
from srmodels.training.finetune import finetune
from srmodels.data.images import write_image
from srmodels.models.model import build_model
from srmodels.training.loop import ConfigError, TrainConfig

from . import procs
from .helpers import ROOT, SCALE, downscale, smooth_image

WORKER = Path(__file__).with_name("ddp_worker.py")
@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(5)
    # 10 patches, global batch 4: two steps per epoch and a ragged remainder that both runs must drop alike.
    for split, count, size in (("train", 10, 64), ("val", 2, 64)):
        for i in range(count):
            hr = smooth_image(rng, size, size)
            write_image(root / split / "hr" / f"{split}{i}_s001.png", hr)
            write_image(root / split / "lr" / f"{split}{i}_s001.png", downscale(hr))
    return root


def run_worker(data: Path, out: Path, nprocs: int, epochs: int, variant: str = "rfdn_tiny", batch: int = 4,
               schedule: str = "constant", ema_decay: float = 0.0) -> None:
    args = [str(data), str(out), variant, str(epochs), str(batch), schedule, str(ema_decay)]
    command = (distributed.torchrun_command(str(WORKER), args, nprocs) if nprocs > 1
               else [sys.executable, str(WORKER), *args])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    procs.run(command, env=env, timeout=300, check=True, what=f"torchrun with {nprocs} process(es)")


@pytest.mark.slow  # three torchrun launches, about a minute each way
@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_two_gloo_processes_train_like_one_and_resume(ddp_data, tmp_path, ema_decay):
    one, two = tmp_path / "one", tmp_path / "two"
    run_worker(ddp_data, one, 1, epochs=2, ema_decay=ema_decay)
    # The 2-process run stops after epoch 1 and resumes (rank 0 reads resume.pth, the others receive it).
    run_worker(ddp_data, two, 2, epochs=1, ema_decay=ema_decay)
    run_worker(ddp_data, two, 2, epochs=2, ema_decay=ema_decay)
    single = torch.load(one / "final_rank0.pt", weights_only=True)
    ranks = [torch.load(two / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"  # DDP keeps replicas equal
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs")
    torch.manual_seed(0)
    init = build_model("rfdn_tiny").net.state_dict()
    assert any(not torch.equal(init[k], single[k]) for k in single)  # it did train

    m1 = json.loads((one / "metrics_rank0.json").read_text())
    m2 = [json.loads((two / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    assert m1["world_size"] == 1 and m2[0]["world_size"] == 2 and m2[1]["world_size"] == 2
    assert m2[0]["timing"]["resumed_from_epoch"] == 1 and m1["timing"]["resumed_from_epoch"] == 0
    assert m1["steps"] == m2[0]["steps"] == m2[1]["steps"] == 4  # 2 epochs x floor(10 / 4)
    # Rank 0 validated the same weights and reported the same losses (all-reduced over the ranks).
    assert m2[0]["best_val_psnr"] == pytest.approx(m1["best_val_psnr"], abs=1e-3)
    assert m2[0]["final_train_loss"] == pytest.approx(m1["final_train_loss"], rel=1e-4)
    assert "best_val_psnr" not in m2[1]  # rank 1 neither validates nor reports
    for name in ("best.pth", "resume.pth", "curve.csv"):
        assert (two / name).is_file()
    if ema_decay:
        # The average (validated and saved by rank 0, restored on every rank by the resume) follows DDP too.
        assert m1["ema_decay"] == m2[0]["ema_decay"] == ema_decay
        best = [torch.load(run / "best.pth", weights_only=True) for run in (one, two)]
        for key in ("params_ema", "params"):
            for name, value in best[0][key].items():
                torch.testing.assert_close(best[1][key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
        assert any(not torch.equal(best[0]["params_ema"][k], best[0]["params"][k]) for k in best[0]["params"])
    else:
        assert "ema_decay" not in m1


def test_global_batch_must_divide_by_world_size(ddp_data, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Dist(rank=0, world=2, local_rank=0))
    train = PairedPatches(ddp_data / "train" / "hr", ddp_data / "train" / "lr", lr_patch=16, scale=SCALE, seed=0)
    with pytest.raises(ConfigError, match=r"global batch \(3\) must divide by the number of processes \(2\)"):
        finetune(build_model("rfdn_tiny"), train, [], TrainConfig(epochs=1, batch=3, lr=1e-3, crop_border=4),
                 tmp_path)


def test_torchrun_command_is_a_standalone_launch():
    cmd = distributed.torchrun_command("stages.finetune", ["dat"], 4, module=True)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and cmd[-3:] == ["-m", "stages.finetune", "dat"]
