"""Run by tests/test_ddp.py, alone or under torchrun: fine-tune a tiny backbone and save its final weights.

Usage: python ddp_worker.py DATA_DIR OUT_DIR VARIANT EPOCHS BATCH SCHEDULE [EMA_DECAY]
"""
import json
import sys
from pathlib import Path

import torch

from srmodels.training import distributed
from srmodels.data.datasets import PairedPatches, list_pairs
from srmodels.training.finetune import BETAS, finetune
from srmodels.models.model import build_model
from srmodels.training.loop import TrainConfig

data, out, variant, epochs, batch, schedule = (Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                                               int(sys.argv[5]), sys.argv[6])
ema_decay = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
info = distributed.init_from_env("cpu")
torch.manual_seed(0)
model = build_model(variant)
train = PairedPatches(data / "train" / "hr", data / "train" / "lr", lr_patch=16, scale=4, seed=0)
val = list_pairs(data / "val" / "hr", data / "val" / "lr", 4)
config = TrainConfig(epochs=epochs, batch=batch, lr=2e-3, schedule=schedule, betas=BETAS, seed=0, crop_border=4,
                     threads=1, ema_decay=ema_decay)
metrics = finetune(model, train, val, config, out, resume_path=out / "resume.pth")
state = {k: v.clone() for k, v in model.net.state_dict().items()}
torch.save(state, out / f"final_rank{info.rank}.pt")
(out / f"metrics_rank{info.rank}.json").write_text(json.dumps(metrics, default=str))
distributed.shutdown(info)
