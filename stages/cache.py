"""Stage `cache@<backbone>`: run the fine-tuned backbone once over every image later stages use."""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

import sys
from pathlib import Path
from typing import Any

import torch

from srmodels.core import layout
from srmodels.models.accelerate import accelerate
from srmodels.models.caching import cache_outputs
from srmodels.models.model import load_model
from srmodels.core.files import staged, write_json
from srmodels.core.runtime import resolve_device, set_threads


def main(params: dict[str, Any], name: str) -> None:
    inf, paths = params["inference"], params["paths"]
    set_threads(params["threads"])
    device = resolve_device(params["device"])
    model = accelerate(load_model(Path(paths["finetune"]) / name / layout.BEST))
    if inf["compile"] and device.type == "cuda":
        model = torch.compile(model)
    seconds: dict[str, list[float]] = {}
    with staged(Path(paths["cache"]) / name, paths["work"], whole=True) as out_dir:
        counts = cache_outputs(model, Path(paths["prepared"]), out_dir, scale=layout.SCALE,
                               self_ensemble=inf["self_ensemble"], tile=inf["tile"],
                               tile_overlap=inf["tile_overlap"], device=device, seconds=seconds)
        write_json(out_dir / layout.COUNTS, counts)
        per_image = {f"seconds_per_image.{k}": sum(v) / len(v) for k, v in seconds.items()}
        with tracked(params, f"cache@{name}") as tracking:
            tracking.log_params({f"inference.{k}": v for k, v in inf.items()})
            tracking.log_metrics({f"num_images.{k}": v for k, v in counts.items()})
            tracking.log_metrics(per_image)
    record(params, f"cache@{name}", per_image)


if __name__ == "__main__":
    run(f"cache@{sys.argv[1]}", main, sys.argv[1])
