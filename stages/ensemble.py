"""Stage `ensemble`: the trained ensemble as one file, logged and registered in MLflow as one model."""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

import json
from pathlib import Path
from typing import Any

from srmodels.core import layout
from srmodels.core.files import staged
from srmodels.models.ensemble import write_ensemble


def model_scores(score_metrics: dict[str, Any]) -> dict[str, float]:
    """The fusion's scores on every scored set (``<set>.psnr_y`` ...): what the registered model is known by."""
    return {f"{set_name}.{k}": v for set_name, models in score_metrics["sets"].items()
            for k, v in models.get("fusion", {}).items() if isinstance(v, (int, float))}


def main(params: dict[str, Any]) -> None:
    paths, members, inf = params["paths"], params["fusion"]["members"], params["inference"]
    with staged(Path(paths["ensemble"]), paths["work"]) as out_dir:
        checkpoints = {m: Path(paths["finetune"]) / m / layout.BEST for m in members}
        spec = write_ensemble(out_dir / layout.ENSEMBLE, checkpoints, Path(paths["fusion"]) / layout.BEST,
                              self_ensemble=inf["self_ensemble"], tile=inf["tile"],
                              tile_overlap=inf["tile_overlap"], cpu_isa=params["cpu_isa"], threads=params["threads"])
    file = Path(paths["ensemble"]) / layout.ENSEMBLE
    scores = model_scores(json.loads((Path(paths["score"]) / layout.METRICS).read_text()))
    with tracked(params, "ensemble") as tracking:
        tracking.log_ensemble(file, registered_name=params["mlflow"].get("registered_model"), scores=scores)
    record(params, "ensemble", {"members": [m["name"] for m in spec["members"]], "bytes": file.stat().st_size})


if __name__ == "__main__":
    run("ensemble", main)
