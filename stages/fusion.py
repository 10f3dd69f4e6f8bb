"""Stage `fusion`: train the fusion weight net on the members' cached outputs, select on validation.

Outputs are staged and published on success; the resume state lives under ``paths.work`` until then.
"""
from stages._common import numeric, provenance, record, run, tracked  # first: pins the CPU kernels before torch loads

from pathlib import Path
from typing import Any

from srmodels.core import layout
from srmodels.models.costs import fusion_macs_per_output_pixel, num_params
from srmodels.data.datasets import FusionCrops, fusion_images
from srmodels.models.fusion import FUSION_KINDS
from srmodels.training.fusion import train_fusion
from srmodels.core.files import staged, write_json
from srmodels.core.runtime import resolve_device, seed_everything, set_threads
from srmodels.training.loop import TrainConfig

# The params the fusion net depends on (dvc.yaml lists the same).
MADE_OF = ("seed", "device", "threads", "cpu_isa", "fusion", "inference.self_ensemble", "metrics.crop_border")


def main(params: dict[str, Any]) -> None:
    fp, paths = params["fusion"], params["paths"]
    prepared, cache, out_dir = Path(paths["prepared"]), Path(paths["cache"]), Path(paths["fusion"])
    resume_path = Path(paths["work"]) / "resume" / "fusion.pth"
    members = fp["members"]
    device = resolve_device(params["device"])
    set_threads(params["threads"])
    seed_everything(params["seed"], device)

    net = FUSION_KINDS[fp["kind"]](num_members=len(members), head=fp["head"])
    # What the net adds to its members per output pixel (the score stage's cost column).
    cost = {"params": num_params(net), "macs_per_pixel": fusion_macs_per_output_pixel(net, fp["kind"])}
    # Built before any training: a crop larger than an image or a cut cache file stops the stage here.
    fusion_train, val = layout.fusion_train(prepared), layout.val(prepared)
    train = FusionCrops([layout.cached_fusion_train(cache, m) for m in members], fusion_train.hr, fusion_train.lr,
                        lr_patch=fp["lr_patch"], scale=layout.SCALE, crops_per_image=fp["crops_per_image"],
                        seed=params["seed"])
    # Select on what the test stage will fuse: self-ensembled members when inference.self_ensemble is on.
    val_images = fusion_images([layout.cached_val(cache, m, params["inference"]["self_ensemble"]) for m in members],
                               val.hr, val.lr, layout.SCALE)
    config = TrainConfig(epochs=fp["epochs"], batch=fp["batch"], lr=fp["lr"], seed=params["seed"],
                         crop_border=params["metrics"]["crop_border"], threads=params["threads"],
                         compile=fp["compile"])

    with staged(out_dir, paths["work"]) as target, tracked(params, "fusion") as tracking:
        tracking.log_params({f"fusion.{k}": v for k, v in fp.items()})
        metrics = train_fusion(net, train, val_images, config, target, kind=fp["kind"], l1_weight=fp["l1_weight"],
                               mse_weight=fp["mse_weight"], members=members, init=fp["init"], device=device,
                               provenance=provenance(params, MADE_OF), resume_path=resume_path,
                               log_metrics=tracking.log_metrics)
        timing = metrics.pop("timing")
        metrics["cost"] = cost
        write_json(target / layout.METRICS, {"cpu_isa": params["cpu_isa"], **metrics})
        tracking.log_metrics({**numeric(metrics), **numeric(timing)})
        tracking.log_artifact(target / layout.CURVE)
        tracking.log_artifact(target / layout.METRICS)  # whole, nested: `srmodels summarize --from mlflow` reads it
        record(params, "fusion", timing)
    resume_path.unlink(missing_ok=True)  # finished: a later run (e.g. `dvc repro --force`) trains anew


if __name__ == "__main__":
    run("fusion", main)
