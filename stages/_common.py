"""What every stage script does first: logging, params, provenance. Kept tiny on purpose."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

# Stage scripts run as `python stages/x.py` from the repo root; make the package importable without installing.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from srmodels.checkpoint import git_commit, params_hash  # noqa: E402
from srmodels.params import ParamsError, load_params  # noqa: E402
from srmodels.runtime import keep_freed_memory  # noqa: E402


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
        return load_params(os.environ.get("SRMODELS_PARAMS", "params.yaml"))
    except ParamsError as err:
        sys.exit(f"{stage}: invalid params: {err}")


def provenance(params: dict[str, Any]) -> dict[str, Any]:
    """Recorded in every checkpoint: where the weights came from."""
    return {"git_commit": git_commit(ROOT), "params_hash": params_hash(params),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
