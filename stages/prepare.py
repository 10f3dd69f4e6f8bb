"""Stage `prepare`: training sub-images, fusion/validation/test splits and benchmark sets under paths.prepared."""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

from pathlib import Path
from typing import Any

from srmodels.core.layout import SCALE
from srmodels.data.prepare import prepare


def main(params: dict[str, Any]) -> None:
    # prepare() checks every input before it writes, and swaps its outputs in only when all are written.
    # data.benchmarks are benchmark@<name> stages of their own (each folder a DVC dependency).
    manifest = prepare(params["data"], SCALE, Path(params["paths"]["prepared"]), with_benchmarks=False)
    with tracked(params, "prepare") as tracking:
        tracking.log_params({f"data.{k}": v for k, v in params["data"].items()})
        tracking.log_metrics({"num_patches": manifest["num_patches"],
                              **{f"num_{k}": len(v) for k, v in manifest["splits"].items() if isinstance(v, list)}})
    record(params, "prepare")


if __name__ == "__main__":
    run("prepare", main)
