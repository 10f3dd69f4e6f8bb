"""The trained ensemble as one MLflow model: logged from code into the pipeline's run and registered by name.

The model (``srmodels/tracking/ensemble_model.py`` plus the ensemble's safetensors file) is linked to the
pipeline's parent run, so the runs table's Model column shows it, and carries the fusion's scores as its
metrics; the registered version carries them as tags. Load it anywhere srmodels is installed with
``mlflow.pyfunc.load_model("models:/<name>/<version>")``.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from srmodels.tracking import use_http_defaults

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("ensemble_model.py")
MODEL_NAME = "ensemble"  # the logged model's name in its run
ARTIFACT = "ensemble"  # ensemble_model.py reads the file under this key


@contextmanager
def _store(uri: str | None) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``download_artifacts``) on the store ``uri``, for the block only:
    ``mlflow.set_tracking_uri`` sets a process-wide default and ``MLFLOW_TRACKING_URI``, both put back after."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if uri:
            mlflow.set_tracking_uri(None)  # no process-wide default (it unsets the variable too)
            if before is not None:
                os.environ["MLFLOW_TRACKING_URI"] = before


def signature() -> Any:
    """uint8 RGB images in (N, H, W, 3), their 4x SR images out (N, 4H, 4W, 3)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def images() -> Any:
        return Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])

    return ModelSignature(inputs=images(), outputs=images())


def requirements() -> list[str]:
    """srmodels (which brings the rest) and the torch release whose kernels the pipeline's bits come from."""
    import torch

    import srmodels

    return [f"srmodels=={srmodels.__version__}", f"torch=={torch.__version__.split('+')[0]}"]


def log_ensemble_model(uri: str, run_id: str, path: Path, *, registered_name: str | None,
                       scores: Mapping[str, float]) -> Any:
    """Log the ensemble file ``path`` as a pyfunc model of run ``run_id`` in the store ``uri``, with ``scores``
    as its metrics, and register it as a new version of ``registered_name`` (None: not registered). Returns
    MLflow's ``ModelInfo``."""
    import mlflow

    from srmodels.models.ensemble import read_ensemble

    description = read_ensemble(path)[0]
    with _store(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(path)}, signature=signature(),
            pip_requirements=requirements(), registered_model_name=registered_name,
            metadata={"srmodels_ensemble": description},
            params={"members": ",".join(m["name"] for m in description["members"]),
                    **{f"inference.{k}": str(v) for k, v in description["inference"].items()},
                    **{f"kernels.{k}": str(v) for k, v in description.get("kernels", {}).items()}})
        if scores:
            mlflow.log_metrics(dict(scores), model_id=info.model_id)
    version = info.registered_model_version
    if registered_name and version is not None:
        client = mlflow.MlflowClient(tracking_uri=uri)
        for key, value in scores.items():
            client.set_model_version_tag(registered_name, str(version), key, str(value))
        log.info("MLflow: the ensemble is model %s, registered as models:/%s/%s", info.model_uri, registered_name,
                 version)
    else:
        log.info("MLflow: the ensemble is model %s (not registered: mlflow.registered_model is null)", info.model_uri)
    return info


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def download_model(model_uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """The files of the logged model ``model_uri`` (``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``runs:/<run id>/ensemble``) from the MLflow store ``tracking_uri``, in ``dst``; a ``UserError`` in one line
    when the store cannot be reached or has no such model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from srmodels.core.errors import UserError

    where = tracking_uri or "the default MLflow store"
    use_http_defaults(tracking_uri or "")  # a server that is down costs seconds, not minutes
    try:
        with _store(tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as err:
        reason = " ".join(str(err.message).split())[:300]
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"{model_uri}: no such model in {where} ({reason})") from None
        raise UserError(f"{model_uri}: could not fetch it from {where} ({reason})") from None
    except OSError as err:  # the server down, a refused connection, a missing artifact file
        raise UserError(f"{model_uri}: could not fetch it from {where} ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]})") from None
