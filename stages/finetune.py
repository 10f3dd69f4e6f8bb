"""Stage `finetune@<backbone>`: fine-tune one backbone on the training sub-images, select on validation.

With ``backbones.<b>.nprocs`` > 1 the stage re-launches itself through torchrun as that many DDP processes on
this node; started by torchrun directly (several nodes, see README) it joins the group torchrun describes.
"""
from _common import provenance, setup

import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from srmodels import distributed
from srmodels.checkpoint import load_into, load_state_dict
from srmodels.datasets import PairedPatches, list_pairs
from srmodels.model import build_model
from srmodels.tracking import start_stage
from srmodels.runtime import resolve_device, seed_everything, set_threads
from srmodels.train import finetune

name = sys.argv[1]
params = setup(f"finetune@{name}")
bb, paths, scale = params["backbones"][name], params["paths"], params["scale"]
prepared, out_dir = Path(paths["prepared"]), Path(paths["finetune"]) / name
device = resolve_device(params["device"])
if bb["nprocs"] > 1 and not distributed.launched_by_torchrun():
    if device.type == "cuda" and bb["nprocs"] > torch.cuda.device_count():
        sys.exit(f"finetune@{name}: nprocs={bb['nprocs']} but only {torch.cuda.device_count()} GPU(s) here")
    command = distributed.torchrun_command(__file__, sys.argv[1:], bb["nprocs"])
    logging.getLogger(__name__).info("launching %d DDP processes: %s", bb["nprocs"], " ".join(command))
    sys.exit(subprocess.call(command))

info = distributed.init_from_env(device.type)
if device.type == "cuda" and info.enabled:
    device = torch.device("cuda", info.local_rank)
set_threads(params["threads"])
seed_everything(params["seed"], device)

model = build_model(bb["variant"])  # seeded above, so a random init is reproducible (and equal on every rank)
if bb["pretrained"]:
    load_into(model.net, load_state_dict(bb["pretrained"]), strict=True, source=bb["pretrained"])
train = PairedPatches(prepared / "train_patches" / "lr", prepared / "train_patches" / "hr", lr_patch=bb["lr_patch"],
                      scale=scale, seed=params["seed"])
val_pairs = list_pairs(prepared / "val" / "hr", prepared / "val" / "lr", scale)

with start_stage(params, f"finetune@{name}", enabled=info.main) as run:
    run.log_params({f"backbones.{name}.{k}": v for k, v in bb.items()})
    metrics = finetune(model, train, val_pairs, epochs=bb["epochs"], batch=bb["batch"], lr=bb["lr"],
                       schedule=bb["schedule"], milestones=bb["milestones"], gamma=bb["gamma"], device=device,
                       seed=params["seed"], out_dir=out_dir, crop_border=params["metrics"]["crop_border"],
                       provenance=provenance(params), log_metrics=run.log_metrics, threads=params["threads"],
                       compile=bb["compile"])
    if info.main:
        metrics = {"backbone": name, "variant": bb["variant"], **metrics}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(out_dir / "curve.csv")
distributed.shutdown(info)
