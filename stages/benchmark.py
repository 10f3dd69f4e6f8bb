"""Stage `benchmark@<name>`: one `data.benchmarks` folder as a scored set, `<paths.prepared>/eval/<name>`.

Its own stage so that the folder is a DVC dependency: replacing an image there re-runs this set's preparation
and what scores it, nothing else.
"""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

import sys
from pathlib import Path
from typing import Any

from srmodels.core.layout import SCALE, eval_set
from srmodels.core.files import staged
from srmodels.data.prepare import prepare_benchmark


def main(params: dict[str, Any], name: str) -> None:
    folder, paths = params["data"]["benchmarks"][name], params["paths"]
    with staged(eval_set(Path(paths["prepared"]), name).root, paths["work"], whole=True) as tmp:
        count = prepare_benchmark(name, folder, SCALE, tmp)
        with tracked(params, f"benchmark@{name}") as tracking:
            tracking.log_params({f"data.benchmarks.{name}": folder})
            tracking.log_metrics({"num_images": count})
    record(params, f"benchmark@{name}")


if __name__ == "__main__":
    run(f"benchmark@{sys.argv[1]}", main, sys.argv[1])
