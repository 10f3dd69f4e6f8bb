"""Stage `finetune@<backbone>`: fine-tune one backbone on the training sub-images, select on validation.

With ``backbones.<b>.nprocs`` > 1 the stage re-launches itself through torchrun as that many DDP processes on
this node; started by torchrun directly (several nodes, see README) it joins the group torchrun describes.
Outputs are staged and published on success; the resume state lives under ``paths.work`` until then.
"""
from stages._common import numeric, provenance, record, run, tracked  # first: pins the CPU kernels before torch loads

import logging
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from srmodels.training import distributed
from srmodels.core import layout
from srmodels.models.checkpoint import load_into, load_state_dict
from srmodels.data.datasets import PairedPatches, list_pairs
from srmodels.core.errors import UserError
from srmodels.training.finetune import BETAS, finetune
from srmodels.models.model import build_model
from srmodels.core.files import staged, write_json
from srmodels.core.params import check_files
from srmodels.core.runtime import resolve_device, seed_everything, set_threads
from srmodels.training.loop import TrainConfig

log = logging.getLogger(__name__)


def main(params: dict[str, Any], name: str) -> None:
    bb, paths = params["backbones"][name], params["paths"]
    stage = f"finetune@{name}"
    check_files(params, [name])  # a missing pretrained checkpoint is named by its key, before any work
    prepared, out_dir = Path(paths["prepared"]), Path(paths["finetune"]) / name
    resume_path = Path(paths["work"]) / "resume" / f"{stage}.pth"
    device = resolve_device(params["device"])
    if bb["nprocs"] > 1 and not distributed.launched_by_torchrun():
        if device.type == "cuda" and bb["nprocs"] > torch.cuda.device_count():
            raise UserError(f"backbones.{name}.nprocs: {bb['nprocs']} but only {torch.cuda.device_count()} "
                            "GPU(s) here")
        command = distributed.torchrun_command("stages.finetune", sys.argv[1:], bb["nprocs"], module=True)
        log.info("launching %d DDP processes: %s", bb["nprocs"], " ".join(command))
        child = subprocess.Popen(command)
        # Pass SIGTERM/SIGINT on to torchrun, which stops the workers (rank 0 marks its MLflow run KILLED).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, _frame: child.send_signal(number))
        sys.exit(child.wait())

    info = distributed.init_from_env(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    set_threads(params["threads"])
    seed_everything(params["seed"], device)

    model = build_model(bb["variant"])  # seeded above, so a random init is reproducible (and equal on every rank)
    if bb["pretrained"]:
        load_into(model.net, load_state_dict(bb["pretrained"]), strict=True, source=bb["pretrained"])
    patches, val = layout.train_patches(prepared), layout.val(prepared)
    train = PairedPatches(patches.hr, patches.lr, lr_patch=bb["lr_patch"], scale=layout.SCALE, seed=params["seed"])
    val_pairs = list_pairs(val.hr, val.lr, layout.SCALE)
    config = TrainConfig(epochs=bb["epochs"], batch=bb["batch"], lr=bb["lr"], schedule=bb["schedule"],
                         milestones=bb["milestones"], gamma=bb["gamma"], betas=BETAS, seed=params["seed"],
                         crop_border=params["metrics"]["crop_border"], threads=params["threads"],
                         compile=bb["compile"], ema_decay=bb["ema_decay"])

    # The params the weights depend on (dvc.yaml's list, with the backbone's entry resolved over the defaults).
    made_of = ("seed", "device", "threads", "cpu_isa", f"backbones.{name}", "data.patches.hr_size",
               "metrics.crop_border")
    with ExitStack() as stack:
        # Rank 0 alone writes; the outputs appear only when the whole stage succeeded.
        target = stack.enter_context(staged(out_dir, paths["work"])) if info.main else out_dir
        tracking = stack.enter_context(tracked(params, stage, enabled=info.main))
        tracking.log_params({f"backbones.{name}.{k}": v for k, v in bb.items()})
        metrics = finetune(model, train, val_pairs, config, target, device=device,
                           provenance=provenance(params, made_of), resume_path=resume_path,
                           log_metrics=tracking.log_metrics)
        if info.main:
            timing = metrics.pop("timing")
            metrics = {"backbone": name, "variant": bb["variant"], "cpu_isa": params["cpu_isa"], **metrics}
            write_json(target / layout.METRICS, metrics)
            tracking.log_metrics({**numeric(metrics), **numeric(timing)})
            tracking.log_artifact(target / layout.CURVE)
            record(params, stage, timing)
    if info.main:
        resume_path.unlink(missing_ok=True)  # finished: a later run (e.g. `dvc repro --force`) trains anew
    distributed.shutdown(info)


if __name__ == "__main__":
    run(f"finetune@{sys.argv[1]}", main, sys.argv[1])
