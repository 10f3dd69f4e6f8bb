"""Stage `prepare`: training sub-images, fusion/validation/test splits and benchmark sets under paths.prepared."""
from _common import setup

from pathlib import Path

from srmodels.data import prepare
from srmodels.tracking import start_stage

params = setup("prepare")
manifest = prepare(params["data"], params["scale"], Path(params["paths"]["prepared"]))
with start_stage(params, "prepare") as run:
    run.log_params({f"data.{k}": v for k, v in params["data"].items()})
    run.log_metrics({"num_patches": manifest["num_patches"],
                     **{f"num_{k}": len(v) for k, v in manifest["splits"].items() if isinstance(v, list)}})
