"""MLflow tracking for the DVC pipeline: one parent run per pipeline run, one nested child run per stage.

May import: core, models (the ensemble logged as an MLflow model). The only package that imports mlflow, and only
once a stage tracks (the import costs seconds). Each stage process finds or creates the top-level run tagged with its pipeline key (:func:`srmodels.core.provenance.pipeline_key`)
and params hash (less the ``mlflow`` section: where results are logged does not change them). The first MLflow
error logs one warning and turns the run into a no-op: tracking never changes a result.

Each run points at exact data versions: a stage's run lists, as MLflow dataset inputs, the outputs of other stages
it reads with the md5 dvc.lock holds for them (DVC writes dvc.lock after each stage, so these are the versions it
reads); the pipeline's run lists the source data (the outputs of stages that read no other stage's outputs). A
stage's own outputs are hashed by DVC after it ends: they appear in the runs of the stages that read them.
Inputs from outside the pipeline (``data.div2k.root``, pretrained weights) are left out: dvc.lock holds the
hash of their previous read until the stage ends. A stage run by hand lists what dvc.lock holds, which is what it
reads when the workspace matches dvc.lock (``dvc status`` clean upstream).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from srmodels.core.errors import UserError
from srmodels.core.layout import METRICS, PER_IMAGE, artifact_location, tracking_uri
from srmodels.core.provenance import git_commit, params_hash, pipeline_key
from srmodels.core.params import flatten

log = logging.getLogger(__name__)

# For http(s) servers, unless the user set them: an unreachable server costs seconds, not minutes of retries.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
TAG_ROLE, TAG_KEY, TAG_COMMIT = "srmodels.role", "srmodels.pipeline_key", "srmodels.git_commit"
TAG_PARAMS_HASH = "srmodels.params_hash"
TAG_DATA_CONTEXT = "mlflow.data.context"  # the Dataset column shows it beside each input
# What the score stage logs on the pipeline's run: the fusion's test PSNR-Y and SSIM-Y.
HEADLINE = ("test.fusion.psnr_y", "test.fusion.ssim_y")
VIEW = "scores"  # the experiment's saved view of the runs table: data versions, source, model, headline scores
# The experiment's kind: MLflow 3 UIs before the GenAI / Model training switch open a "custom_model_development"
# experiment on its runs table, an untagged one without traces as GenAI (its traces overview). Set on every start.
KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}

# MLflow rejects longer values and bigger batches: one long list-valued param must not end tracking.
_MAX_VALUE, _MAX_KEY, _BATCH = 6000, 250, 100
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")


def use_http_defaults(uri: str) -> None:
    """For an http(s) store, MLflow's retries and timeout as HTTP_ENV_DEFAULTS sets them, unless the user set them."""
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)


def ui_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table in the UI of the MLflow server at ``server``, as the saved view shows it."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW}")


def _default_experiment_tags() -> dict[str, str]:
    """Set where missing, so that a user's edits stay: the charts' primary metric and the saved view (the UI
    keeps a view in the experiment tag ``mlflow.sharedViewState.<id>``: a name, times, and the view's state)."""
    now = int(time.time() * 1000)
    columns = [f"attributes.`{name}`" for name in ("Dataset", "Source", "Models")]
    columns += [f"metrics.`{m}`" for m in HEADLINE]
    view = {"name": VIEW, "createdAt": now, "updatedAt": now, "state": json.dumps({"selectedColumns": columns})}
    return {"mlflow.experiment.primaryMetric.name": HEADLINE[0],
            "mlflow.experiment.primaryMetric.greaterIsBetter": "true",
            f"mlflow.sharedViewState.{VIEW}": json.dumps(view)}


class Terminated(SystemExit):
    """SIGTERM/SIGINT in a tracked stage: ends the runs KILLED, then exits 128 + signal."""


def pipeline_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "mlflow"}


def _present(tags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tags.items() if v}


class StageRun:
    """``with StageRun(params, stage) as run``: the stage's child run; a no-op when off, disabled or broken."""

    uri = run_id = parent_run_id = _client = None
    active = _warned = _ending = False
    _pending = 0  # a signal that came while the runs were being ended

    def __init__(self, params: Mapping[str, Any], stage: str, enabled: bool = True) -> None:
        self.params, self.stage, self.enabled = params, stage, enabled
        self._skipped: dict[str, int] = {}  # what was not logged, and how many
        self._handlers: dict[int, Any] = {}  # the signal handlers to restore

    def __enter__(self) -> StageRun:
        self.active = self.enabled  # False on DDP ranks other than 0
        self._guarded("start the runs", self._start)
        if self.active and threading.current_thread() is threading.main_thread():
            # Python's default SIGTERM action skips unwinding: the runs would stay RUNNING. Other handlers stay.
            for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
                if signal.getsignal(signum) is default:
                    self._handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._ending:
            raise Terminated(128 + signum)
        self._pending = signum

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._ending = True
        status = ("FINISHED" if exc is None or isinstance(exc, SystemExit) and exc.code in (0, None) else
                  "KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED")
        for run_id in (self.run_id, self.parent_run_id):  # the parent ends with each stage; the next reopens it
            self._guarded("end the runs", lambda: self._client.set_terminated(run_id, status=status))
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        if self._skipped:
            log.info("MLflow: not logged for stage %s: %s", self.stage,
                     ", ".join(f"{n} {what}" for what, n in self._skipped.items()))
        signum = int(exc.code) - 128 if isinstance(exc, Terminated) else self._pending
        if signum:
            log.warning("stage %s stopped by %s (MLflow run %s ended %s)", self.stage, signal.Signals(signum).name,
                        self.run_id, status)
            if not isinstance(exc, Terminated):
                raise Terminated(128 + signum)

    def _start(self) -> None:
        self.uri = tracking_uri(self.params)
        if self.uri is None:
            self.active = False
            return log.info("MLflow tracking is off; stage %s is not tracked", self.stage)
        use_http_defaults(self.uri)
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        exp_id = self._experiment(self.params.get("mlflow", {}).get("experiment", "srmodels"))
        code, phash = git_commit(), params_hash(pipeline_params(self.params))
        key = pipeline_key(code, phash)
        self.parent_run_id = self._parent(exp_id, key, code, phash)
        self.run_id = self._client.create_run(exp_id, run_name=self.stage, tags=_present({
            TAG_ROLE: "stage", "srmodels.stage": self.stage, TAG_KEY: key, TAG_COMMIT: code,
            "mlflow.parentRunId": self.parent_run_id, "srmodels.dvc_stage": os.environ.get("DVC_STAGE"),
            **_source_tags(_script(), code)})).info.run_id
        log.info("MLflow: stage %s is run %s under %s (%s)", self.stage, self.run_id, self.parent_run_id, self.uri)
        # By every stage, as the one that created the parent may have died first; MLflow accepts equal re-logs.
        self.log_params(pipeline_params(self.params), parent=True)
        self._log_data(code)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if missing, tagged so that MLflow's UI shows it as model training."""
        exp = self._client.get_experiment_by_name(name)
        try:
            if exp is None:
                return self._client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                      tags={**_default_experiment_tags(), **KIND_TAGS})
        except Exception:
            if not (exp := self._client.get_experiment_by_name(name)):  # else another stage created it just now
                raise
        missing = {k: v for k, v in _default_experiment_tags().items() if k not in exp.tags}
        for tag, value in {**missing, **{k: v for k, v in KIND_TAGS.items() if exp.tags.get(k) != v}}.items():
            self._client.set_experiment_tag(exp.experiment_id, tag, value)
        return exp.experiment_id

    def _log_data(self, code: str) -> None:
        """The data versions this stage reads on its run, the source data among them on the pipeline's."""
        try:
            versions = data_read(Path.cwd(), os.environ.get("DVC_STAGE") or self.stage)
        except Exception as err:  # noqa: BLE001 - a stage run outside its DVC pipeline: no data versions
            return log.info("MLflow: no data versions for stage %s (%s: %s)", self.stage, type(err).__name__,
                            (str(err).strip().splitlines() or [""])[0])
        for run_id, chosen, context in ((self.run_id, versions, "input"),
                                        (self.parent_run_id, [v for v in versions if v.source], "source")):
            if chosen:
                self._guarded("log data versions", lambda: self._client.log_inputs(
                    run_id, [_dataset_input(v, code, context) for v in chosen]), "data versions", len(chosen))

    def _parent(self, exp_id: str, key: str, code: str, phash: str) -> str:
        quote = '"' if "'" in key else "'"  # MLflow filters have no escapes

        def oldest() -> str | None:  # every process picks the same one when a race created two
            runs = self._client.search_runs(
                [exp_id], f"tags.`{TAG_KEY}` = {quote}{key}{quote} and tags.`{TAG_ROLE}` = 'pipeline' "
                          f"and tags.`{TAG_PARAMS_HASH}` = '{phash}'", order_by=["attributes.start_time"])
            return min(((r.info.start_time, r.info.run_id) for r in runs), default=(0, None))[1]

        if found := oldest():
            self._client.update_run(found, status="RUNNING")
            return found
        exp_name = os.environ.get("DVC_EXP_NAME")
        name = exp_name or f"repro-{code[:7]}{'+dirty' if code.endswith('+dirty') else ''}-{phash[:8]}"
        ours = self._client.create_run(exp_id, run_name=name, tags=_present({
            TAG_ROLE: "pipeline", TAG_KEY: key, TAG_PARAMS_HASH: phash, TAG_COMMIT: code,
            **_source_tags("dvc.yaml", code), "srmodels.dvc_exp_name": exp_name,
            "srmodels.dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}))
        if (winner := oldest()) != ours.info.run_id:
            self._client.delete_run(ours.info.run_id)
        return winner

    def _guarded(self, action: str, fn: Callable[[], Any], what: str = "", count: int = 1) -> None:
        if self.active:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - tracking must never stop the stage
                self.active = False
                if not self._warned:
                    self._warned = True
                    log.warning("MLflow: could not %s in %s (%s: %s); stage %s continues untracked", action,
                                self.uri, type(err).__name__, (str(err).strip().splitlines() or [""])[0], self.stage)
        if what:
            self._skipped[what] = self._skipped.get(what, 0) + count

    def _log(self, kind: str, values: Mapping[str, Any], parent: bool, entity: Callable[..., Any]) -> None:
        """The one way params, metrics and tags reach MLflow: flat, with names MLflow accepts, in batches."""
        flat = {_BAD_KEY_CHARS.sub("_", str(k))[:_MAX_KEY]: v for k, v in flatten(dict(values)).items()}
        what = f"pipeline {kind}" if parent else kind

        def send() -> None:
            import mlflow.entities

            items = [entity(mlflow.entities, k, v) for k, v in flat.items()]
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(self.parent_run_id if parent else self.run_id, **{kind: items[i:i + _BATCH]})

        if flat:
            self._guarded(f"log {what}", send, what, len(flat))

    def log_params(self, params: Mapping[str, Any], *, parent: bool = False) -> None:
        """Nested mappings become dotted keys. MLflow refuses a new value for a logged param."""
        self._log("params", params, parent, lambda e, k, v: e.Param(k, str(v)[:_MAX_VALUE]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, parent: bool = False) -> None:
        """``step`` (e.g. the epoch) draws curves; ``parent=True`` puts final numbers on the pipeline's row."""
        now = int(time.time() * 1000)
        self._log("metrics", metrics, parent, lambda e, k, v: e.Metric(k, float(v), now, int(step or 0)))

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        self._log("tags", tags, parent, lambda e, k, v: e.RunTag(k, str(v)[:_MAX_VALUE]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files, into this stage's artifacts."""
        path = Path(path)
        if self.active and not path.exists():  # the caller's mistake, not the store's: tracking goes on
            return log.warning("MLflow: artifact %s not logged (no such file)", path)

        def send() -> None:
            (self._client.log_artifacts if path.is_dir() else self._client.log_artifact)(
                self.run_id, str(path), artifact_path)

        self._guarded(f"log artifact {path}", send, "artifacts")

    def log_ensemble(self, path: str | Path, *, registered_name: str | None, scores: Mapping[str, float]) -> None:
        """The ensemble file as one MLflow model of the pipeline's run, with ``scores`` as its metrics, registered
        under ``registered_name`` unless None (:mod:`srmodels.tracking.registry`)."""
        from srmodels.tracking.registry import log_ensemble_model

        self._guarded("log the ensemble's model", lambda: log_ensemble_model(
            self.uri, self.parent_run_id, Path(path), registered_name=registered_name, scores=scores), "models")


def _script() -> str:
    """The running script as MLflow's own runs name it: its path, relative to the current directory if under it."""
    path = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] not in ("", "-c") else None
    if path is None or not path.is_file():
        return "python"
    return str(path.relative_to(Path.cwd().resolve())) if path.is_relative_to(Path.cwd().resolve()) else str(path)


def _source_tags(name: str, code: str) -> dict[str, Any]:
    """The tags of the runs table's Source and Version columns."""
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": None if code.startswith("unknown") else code.split("+")[0]}


class DataVersion(NamedTuple):
    """An output of a pipeline stage at the version dvc.lock records: its path, md5, the stage that wrote it, and
    whether that stage reads no other stage's outputs (source data)."""

    path: str
    md5: str
    stage: str
    source: bool


def _covers(a: str, b: str) -> bool:
    """``b`` is the path ``a`` or lies under it."""
    return a == b or b.startswith(a.rstrip("/") + "/")


def _overlap(a: str, b: str) -> bool:
    return _covers(a, b) or _covers(b, a)


def data_read(root: Path, stage: str) -> list[DataVersion]:
    """The outputs of other stages in ``root``'s dvc.lock that ``stage`` (a dvc.yaml stage name) depends on: the
    whole output when the dependency lies inside it, each output under a dependency that is a parent folder."""
    lock_file = root / "dvc.lock"
    if not lock_file.exists():
        return []
    import yaml

    lock = (yaml.safe_load(lock_file.read_text()) or {}).get("stages") or {}
    outs = {o["path"]: (o["md5"], name) for name, entry in lock.items() for o in entry.get("outs") or ()
            if o.get("md5")}
    if not outs:
        return []

    def is_source(name: str) -> bool:
        return not any(_overlap(d["path"], p) for d in lock[name].get("deps") or () for p, (_, other) in outs.items()
                       if other != name)

    deps = _stage_deps(root, stage)
    return [DataVersion(path, md5, name, is_source(name)) for path, (md5, name) in sorted(outs.items())
            if name != stage and any(_overlap(d, path) for d in deps)]


def _stage_deps(root: Path, stage: str) -> list[str]:
    """The dependency paths of a stage as DVC resolves dvc.yaml (templates, foreach) now."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [dep.def_path for found in repo.stage.collect(stage) for dep in found.deps]


def _dataset_input(version: DataVersion, code: str, context: str) -> Any:
    """An MLflow dataset input naming a DVC path at its md5, the stage that wrote it and the git commit."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = json.dumps({"path": version.path, "dvc_stage": version.stage, "git_commit": code})
    return DatasetInput(Dataset(name=version.path, digest=version.md5, source_type="dvc", source=source),
                        [InputTag(TAG_DATA_CONTEXT, context)])


def finished_pipelines(params: Mapping[str, Any], names: list[str] | None = None,
                       root: Path | None = None) -> list[dict[str, Any]]:
    """Finished pipeline runs of the MLflow store, newest per name: each its name, params, source, the score
    stage's per-image table (text) and the fusion and score stages' metrics (``srmodels.evaluation.summarize``
    turns them into ``PipelineRun``s).

    A pipeline run counts when its ``fusion`` and ``score`` stages both finished in it: MLflow only knows what
    ran, so an experiment that DVC restored entirely from its cache has no run here (``--from dvc`` has it).
    Params come back as MLflow stored them (text), which is all grouping by configuration needs.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root) or ""
    experiment = params.get("mlflow", {}).get("experiment", "srmodels")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"{uri}: no MLflow experiment '{experiment}'")
    parents = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=5000)
    runs, seen = [], set()
    for parent in parents:
        name = parent.info.run_name
        if name in seen or (names and name not in names):
            continue
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                      "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
        stage = {child.data.tags.get("srmodels.stage"): child for child in reversed(children)}  # the newest each
        if "fusion" not in stage or "score" not in stage:
            log.info("MLflow run %s (%s): no finished fusion and score stages; skipped", name, parent.info.run_id)
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                table = Path(client.download_artifacts(stage["score"].info.run_id, PER_IMAGE, tmp)).read_text()
                fusion = json.loads(Path(client.download_artifacts(stage["fusion"].info.run_id, METRICS,
                                                                   tmp)).read_text())
                try:  # the score stage's metrics.json carries the rows' costs, if it was logged
                    score = json.loads(Path(client.download_artifacts(stage["score"].info.run_id, METRICS,
                                                                      tmp)).read_text())
                except Exception:  # noqa: BLE001 - not logged: no costs
                    score = {}
        except Exception as err:  # noqa: BLE001 - MLflow raises its own kinds for a missing artifact
            log.info("MLflow run %s: %s or the fusion's metrics.json not logged (%s); skipped", name, PER_IMAGE,
                     type(err).__name__)
            continue
        seen.add(name)
        runs.append({"name": name, "params": dict(parent.data.params), "source": f"mlflow:{parent.info.run_id}",
                     "per_image": table, "fusion_metrics": fusion, "score_metrics": score})
    missing = sorted(set(names or ()) - seen)
    if missing:
        raise UserError(f"{uri}: no finished pipeline run named {', '.join(missing)} in experiment '{experiment}'")
    return runs
