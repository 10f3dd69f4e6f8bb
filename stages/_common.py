"""What every stage script does first: pin the CPU kernels, then logging, params, provenance, one-line errors.

Import this module before anything that imports torch: importing it pins the CPU instruction set named by
``cpu_isa`` in params.yaml (``srmodels.core.isa``), which torch reads once when it loads.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from srmodels.core import isa  # no torch inside
from srmodels.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

PARAMS_FILE = os.environ.get("SRMODELS_PARAMS", "params.yaml")
# SRMODELS_DEBUG=1 shows the traceback of an error that is otherwise printed as one line.
DEBUG = os.environ.get("SRMODELS_DEBUG", "") not in ("", "0")

try:
    isa.pin_from_params(PARAMS_FILE)
except UserError as _err:
    sys.exit(f"{Path(sys.argv[0]).stem}: error: {PARAMS_FILE}: {_err}")

import logging  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any, Callable, Iterator, Sequence  # noqa: E402

import srmodels  # noqa: E402

from srmodels.core.provenance import git_commit, params_hash  # noqa: E402
from srmodels.core.files import write_json  # noqa: E402
from srmodels.core.params import ParamsError, load_params  # noqa: E402
from srmodels.core.runtime import keep_freed_memory  # noqa: E402

_started = time.time()


def setup(stage: str) -> dict[str, Any]:
    """Configure logging and return the validated params; invalid params end the stage with one line."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # under torchrun: tag lines with the rank; ranks other than 0 only report problems
        stage = f"{stage}[rank {rank}/{world}]"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {stage} %(levelname)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    keep_freed_memory()
    try:
        params = load_params(PARAMS_FILE)
        isa.provenance()  # fails if the pin did not take effect
    except ParamsError as err:
        sys.exit(f"{stage}: invalid params: {err}")
    except UserError as err:
        sys.exit(f"{stage}: error: {err}")
    return params


def run(stage: str, main: Callable[..., None], *args: Any) -> None:
    """Run a stage's ``main(params, *args)``: a user error is one line and exit code 1, Ctrl-C exit code 130."""
    params = setup(stage)
    try:
        main(params, *args)
    except UserError as err:
        if DEBUG:
            raise
        sys.exit(f"{stage}: error: {err}")
    except KeyboardInterrupt:
        print(f"{stage}: interrupted; the previous outputs are unchanged", file=sys.stderr)
        sys.exit(130)


def provenance(params: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Recorded in every checkpoint: what determined its weights.

    ``keys`` are the dotted params the stage's result depends on (those it lists in dvc.yaml, a backbone's
    entry as resolved over backbone_defaults); their hash, the srmodels version and the kernels' pin describe
    the work. What differs between two runs of the same work (git commit, dirty tree, experiment name, machine,
    time, paths) goes to the run record and MLflow instead, so identical work writes identical bytes and DVC
    sees that nothing downstream changed.
    """
    return {"params_hash": params_hash({key: pick(params, key) for key in keys}), "params_keys": list(keys),
            "srmodels_version": srmodels.__version__, "cpu_isa": params["cpu_isa"]}


def pick(params: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (``backbones.dat``)."""
    value: Any = params
    for part in key.split("."):
        value = value[part]
    return value


def run_provenance(params: dict[str, Any]) -> dict[str, Any]:
    """Where a run came from (run records and MLflow only, never a DVC output)."""
    return {"git_commit": git_commit(ROOT), "params_hash": params_hash(params),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "cpu_isa": params["cpu_isa"]}


@contextmanager
def tracked(params: dict[str, Any], stage: str, enabled: bool = True) -> Iterator[Any]:
    """The stage's MLflow run, tagged with the machine and kernels it ran on."""
    from srmodels.tracking import StageRun  # mlflow loads only in stages that track

    with StageRun(params, stage, enabled=enabled) as tracking:
        tracking.set_tags({f"srmodels.{k}": v for k, v in isa.provenance().items()})
        yield tracking


def record(params: dict[str, Any], stage: str, timing: dict[str, Any] | None = None) -> None:
    """The stage's run record, ``<paths.runs>/<stage>.json``: wall-clock figures and the machine.

    Kept apart from the DVC outputs and metrics, which hold only what the seed and the data determine.
    """
    write_json(Path(params["paths"]["runs"]) / f"{stage}.json", {
        "stage": stage, "wall_seconds": round(time.time() - _started, 3), "timing": timing or {},
        "machine": isa.provenance(), **run_provenance(params)})


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The int/float entries of a flat mapping (what MLflow metrics take)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
