"""Stage `fusion`: train the fusion weight net on the members' cached outputs, select on validation."""
from _common import numeric, provenance, record, run, tracked  # first: pins the CPU kernels before torch loads

from pathlib import Path
from typing import Any

from srmodels.datasets import FusionCrops, fusion_images
from srmodels.fusion import FUSION_KINDS
from srmodels.outputs import staged, write_json
from srmodels.runtime import resolve_device, seed_everything, set_threads
from srmodels.train import train_fusion


def main(params: dict[str, Any]) -> None:
    fp, paths, scale = params["fusion"], params["paths"], params["scale"]
    prepared, cache, out_dir = Path(paths["prepared"]), Path(paths["cache"]), Path(paths["fusion"])
    members = fp["members"]
    device = resolve_device(params["device"])
    set_threads(params["threads"])
    seed_everything(params["seed"], device)

    net = FUSION_KINDS[fp["kind"]](num_candidates=len(members))
    # Built before any training: a crop larger than an image or a cut cache file stops the stage here.
    train = FusionCrops([cache / m / "fusion_train" for m in members], prepared / "fusion_train" / "hr",
                        prepared / "fusion_train" / "lr", lr_patch=fp["lr_patch"], scale=scale,
                        crops_per_image=fp["crops_per_image"], seed=params["seed"])
    # Select on what the test stage will fuse: self-ensembled members when inference.self_ensemble is on.
    val_split = "val_se" if params["inference"]["self_ensemble"] else "val"
    val = fusion_images([cache / m / val_split for m in members], prepared / "val" / "hr", prepared / "val" / "lr",
                        scale)

    with staged(out_dir, paths["work"]) as target, tracked(params, "fusion") as tracking:
        tracking.log_params({f"fusion.{k}": v for k, v in fp.items()})
        metrics = train_fusion(net, train, val, kind=fp["kind"], epochs=fp["epochs"], batch=fp["batch"],
                               lr=fp["lr"], l1_weight=fp["l1_weight"], mse_weight=fp["mse_weight"], device=device,
                               seed=params["seed"], out_dir=target, crop_border=params["metrics"]["crop_border"],
                               provenance=provenance(params), members=members, log_metrics=tracking.log_metrics,
                               threads=params["threads"], compile=fp["compile"])
        timing = metrics.pop("timing")
        write_json(target / "metrics.json", {"cpu_isa": params["cpu_isa"], **metrics})
        tracking.log_metrics({**numeric(metrics), **numeric(timing)})
        tracking.log_artifact(target / "curve.csv")
        record(params, "fusion", timing)


if __name__ == "__main__":
    run("fusion", main)
