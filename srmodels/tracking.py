"""MLflow tracking for the DVC pipeline: one parent run per pipeline run, one nested child run per stage.

This is the only module that imports mlflow (lazily, inside ``start_stage``: the import costs seconds).

How separate stage processes find their common parent
    Every stage computes the same *pipeline key* (:func:`pipeline_key`) and searches the MLflow experiment for
    a top-level run tagged ``srmodels.pipeline_key == key`` (and the same ``srmodels.params_hash``), creating it
    when absent, named after the DVC experiment or ``repro-<commit>-<params hash>``. The parent carries the
    flattened params, the tags (commit, DVC experiment name, key) and the final metrics; each stage that ran is
    a child under it. The key is, first match wins:

    * ``$DVC_EXP_NAME`` under ``dvc exp run`` (workspace, ``--temp``, ``--queue``: each experiment has its own
      name). An experiment name reused with different params (``dvc exp run -n x -f``) gets a new parent,
      because the params hash is part of the search.
    * ``<commit>-dvc-<pid>.<start>.<boot>`` under ``dvc repro``: the nearest ancestor process whose command line
      is ``dvc`` (found through ``/proc/<pid>/stat``), identified by its pid, its start time (clock ticks since
      boot) and the boot id. All stages of one invocation share that ancestor and no other invocation has the
      same triple, so one ``dvc repro`` is one parent and two are two, even at the same commit and params.
      The commit here is HEAD without the dirty flag: DVC rewrites tracked files while it runs (``dvc.lock``
      and ``cache: false`` outputs such as ``data/score/metrics.json``), which must not split the run. The
      parent's name and commit tag keep the dirty flag as the first stage saw it.
    * ``<commit(+dirty)>-<params hash>`` otherwise (a stage script run by hand, or no ``/proc``): stages run at
      the same commit with the same params share a parent. ``+dirty`` ignores ``dvc.lock`` and ``.gitignore``.

    The params hash leaves out the ``mlflow`` section: tracking settings do not change what the pipeline
    computes, so they neither make a new pipeline identity nor appear in the parent's params.

Where the data goes
    ``params['mlflow']['tracking_uri']`` (default ``sqlite:///mlflow.db``), overridden by ``$MLFLOW_TRACKING_URI``.
    ``none`` / ``off`` (or an empty params value) turns tracking off. A relative sqlite path (or a bare store
    folder) resolves against the repository root: ``$DVC_ROOT`` when set, else the current directory. DVC sets
    ``DVC_ROOT`` for every stage command, and for ``dvc exp run`` (workspace, ``--temp`` and queued runs alike)
    it overrides it with the *parent* repository's root, not the ``.dvc/tmp/exps/...`` copy (dvc 3.x,
    ``repo/experiments/queue/base.py``; checked with dvc 3.67 ``--temp``), so temporary experiments write to
    the repository's own ``mlflow.db``. A new experiment gets an absolute
    ``file://.../mlartifacts`` artifact location next to the database, so artifacts never land inside
    ``.dvc/tmp`` either. For an http(s) server the server decides where artifacts go.

Failures never stop a stage
    Every mlflow call is guarded. The first failure logs one warning (what failed, and that nothing more of
    this stage will be logged) and turns the run into a no-op; what was skipped is summarised at INFO when the
    stage ends. For http(s) servers ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=5``
    are set (unless the user set them), so an unreachable server costs seconds, not minutes of retries.
    Exceptions raised by the stage's own code inside ``with start_stage(...)`` propagate unchanged; the child
    and parent runs are then marked FAILED.

Signals
    Python's default SIGTERM action ends the process without unwinding, which would leave both runs RUNNING
    forever. While a tracked stage runs (main thread only), SIGTERM and SIGINT, where they still have their
    default handlers, raise :class:`Terminated` (a ``SystemExit`` with code 128 + signal): the runs are marked
    KILLED, one warning line says so, and the process exits 143 (SIGTERM) or 130 (SIGINT) without a traceback.
    A ``KeyboardInterrupt`` raised otherwise also marks them KILLED. The previous handlers are restored when
    the stage ends; a signal that arrives while the runs are being ended waits for that, then exits.

Usage::

    with start_stage(params, "fusion") as run:
        run.log_params(params["fusion"])
        for epoch in ...:
            run.log_metrics({"train_loss": loss, "val_psnr_y": psnr}, step=epoch)
        run.log_artifact("results/fusion/curve.png")
        run.log_parent_metrics({"test.psnr_y": 28.4})   # final numbers on the parent row
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

from .checkpoint import git_commit as code_version, params_hash
from .params import flatten

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "srmodels"
ARTIFACTS_DIR = "mlartifacts"
# Set only for http(s) servers and only when the user did not: fail in seconds instead of retrying for minutes.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
OFF_VALUES = ("", "none", "off")

TAG_ROLE = "srmodels.role"                # 'pipeline' on parents, 'stage' on children
TAG_KEY = "srmodels.pipeline_key"
TAG_PARAMS_HASH = "srmodels.params_hash"
TAG_COMMIT = "srmodels.git_commit"
TAG_EXP_NAME = "srmodels.dvc_exp_name"
TAG_BASELINE = "srmodels.dvc_baseline_rev"
TAG_STAGE = "srmodels.stage"
PARENT_TAG = "mlflow.parentRunId"         # what makes a run nested in the MLflow UI

# MLflow limits (mlflow.utils.validation): longer values or bigger batches are rejected, which would disable
# tracking for the whole stage over one long list-valued param.
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used for this stage (the message says why)."""


class Terminated(SystemExit):
    """SIGTERM or SIGINT inside a tracked stage: unwinds like ``sys.exit(128 + signal)``, runs marked KILLED."""


# --------------------------------------------------------------------------------------------------------------
# Pure helpers (no mlflow import)
# --------------------------------------------------------------------------------------------------------------
def repo_root() -> Path:
    """``$DVC_ROOT`` (the repository root even for ``dvc exp run --temp``) or the current directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(params: Mapping[str, Any], root: Path | None = None) -> str | None:
    """The store to use, relative local paths made absolute against ``root``; None when tracking is off."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = env if env else params.get("mlflow", {}).get("tracking_uri", DEFAULT_TRACKING_URI)
    uri = uri.strip()
    if uri.lower() in OFF_VALUES:
        return None
    root = root or repo_root()
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{(root / path).resolve()}{sep}{query}"  # four slashes: an absolute path
        return uri
    if ":" not in uri and not uri.startswith("databricks"):
        return (root / uri).resolve().as_uri()  # a bare folder: MLflow's file store
    return uri


def artifact_location(uri: str, root: Path | None = None) -> str | None:
    """Absolute ``file://`` artifact root for a new experiment; None where the server decides (http, databricks)."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https", "databricks", "file"):
        return None  # a server has its own artifact store; a file store keeps artifacts inside itself
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):].partition("?")[0]
        if path.startswith("/"):
            return (Path(path).parent / ARTIFACTS_DIR).as_uri()
    return ((root or repo_root()) / ARTIFACTS_DIR).as_uri()  # other databases: beside the repository


def _is_dvc(argv: list[str]) -> bool:
    """``dvc ...``, ``python .../bin/dvc ...`` (a script's shebang) or ``python -m dvc ...``."""
    names = [os.path.basename(a) for a in argv[:2]]
    return names[:1] == ["dvc"] or names[1:2] == ["dvc"] or argv[1:3] == ["-m", "dvc"]


def dvc_invocation() -> str | None:
    """``<pid>.<start ticks>.<boot id>`` of the nearest ``dvc`` process above this one: unique to one ``dvc repro``
    invocation. None without such an ancestor or without ``/proc``."""
    pid = os.getppid()  # ancestors only: this process is the stage
    try:
        for _ in range(64):  # bounded walk: a loop in a broken /proc must not hang the stage
            if pid <= 1:
                return None
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            # Fields after the parenthesised command name (which may hold spaces): state, ppid, ..., starttime.
            fields = stat[stat.rindex(")") + 2:].split()
            if _is_dvc(argv):
                # Start ticks count from boot: the boot id tells two boots (or two machines) apart.
                boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
                return f"{pid}.{fields[19]}.{boot}"
            pid = int(fields[1])
    except (OSError, ValueError, IndexError):  # no /proc (macOS), or a process that ended under us
        pass
    return None


def pipeline_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params that define a pipeline run: all but the ``mlflow`` section (where it is logged, not what)."""
    return {k: v for k, v in params.items() if k != "mlflow"}


def pipeline_key(code: str, phash: str) -> str:
    """Equal in every stage of one pipeline run (see the module docstring); ``phash`` of :func:`pipeline_params`."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    dvc = dvc_invocation()
    return f"{code.split('+')[0]}-dvc-{dvc}" if dvc else f"{code}-{phash}"


def _key(name: Any) -> str:
    """A metric/param name MLflow accepts (e.g. 'finetune@dat' -> 'finetune_dat')."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:_MAX_KEY]


def _value(value: Any) -> str:
    return str(value)[:_MAX_PARAM_VALUE]


def _flat(values: Mapping[str, Any]) -> dict[str, Any]:
    # Nested sections ({'data': {'samples': {...}}}) become dotted keys, like the parent's params.
    return {_key(k): v for k, v in flatten(dict(values)).items()}


def _quote(value: str) -> str:
    """A string literal for an MLflow filter (it has no escapes: pick the quote the value lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingUnavailable(f"pipeline key {value!r} holds both quote characters; cannot search for it")


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------------------------
# The stage run
# --------------------------------------------------------------------------------------------------------------
class StageRun:
    """One stage's child run (and access to its pipeline's parent). A no-op when tracking is off or failed.

    Use through :func:`start_stage`. Attributes ``run_id`` / ``parent_run_id`` / ``experiment_id`` are None
    when nothing is tracked; ``active`` says whether calls still reach MLflow.
    """

    def __init__(self, params: Mapping[str, Any], stage: str, enabled: bool = True) -> None:
        self.params = params
        self.stage = stage
        self.enabled = enabled
        self.uri: str | None = None
        self.key: str | None = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = False
        self._client: Any = None
        self._failed = False
        self._skipped: dict[str, int] = {}
        self._logged_params: dict[str, str] = {}
        self._old_handlers: dict[int, Any] = {}  # signal -> the default handler to restore in __exit__
        self._ending = False
        self._pending_signal = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> StageRun:
        if not self.enabled:  # e.g. a DDP rank other than 0: rank 0 alone tracks the stage
            return self
        try:
            self.uri = tracking_uri(self.params)
        except Exception as err:  # noqa: BLE001 - a bad URI must not stop the stage either
            self._fail("resolve the tracking URI", err)
            return self
        if self.uri is None:
            log.info("MLflow tracking is off (tracking_uri 'none'); stage %s is not tracked", self.stage)
            return self
        if self.uri.startswith(("http://", "https://")):
            for name, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)
        try:
            self._start()
            self.active = True
        except Exception as err:  # noqa: BLE001
            self._fail(f"start the runs in {self.uri}", err)
        if self.active and threading.current_thread() is threading.main_thread():  # signal.signal's condition
            # Only Python's defaults are replaced: a handler the stage installed (or an inherited SIG_IGN) stays.
            for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
                if signal.getsignal(signum) is default:
                    self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._ending:  # the runs are being ended: let that finish, __exit__ exits afterwards
            self._pending_signal = signum
            return
        raise Terminated(128 + signum)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._ending = True
        status = None
        if self.active:
            if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
                status = "FINISHED"  # sys.exit() / sys.exit(0) is a normal end
            elif isinstance(exc, (KeyboardInterrupt, Terminated)):
                status = "KILLED"
            else:
                status = "FAILED"
            self._call("end the runs", lambda: self._end(status))
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self._skipped:
            log.info("MLflow: not logged for stage %s: %s", self.stage,
                     ", ".join(f"{n} {what}" for what, n in self._skipped.items()))
        signum = int(exc.code) - 128 if isinstance(exc, Terminated) else self._pending_signal
        if signum:
            log.warning("stage %s stopped by %s (MLflow run %s ended %s)", self.stage, signal.Signals(signum).name,
                        self.run_id, status)
            if not isinstance(exc, Terminated):
                raise Terminated(128 + signum)  # a signal during the ending: exit now that the runs are ended
        # never suppress the stage's own exception

    def _start(self) -> None:
        from mlflow import MlflowClient  # slow import: only stages that track pay for it

        self._client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment()
        code = code_version()  # git runs once per stage: the key and the tags share it
        phash = params_hash(pipeline_params(self.params))
        self.key = pipeline_key(code, phash)
        self.parent_run_id = self._parent(code, phash)
        tags = {TAG_ROLE: "stage", TAG_STAGE: self.stage, TAG_KEY: self.key, TAG_COMMIT: code,
                PARENT_TAG: self.parent_run_id}
        if os.environ.get("DVC_STAGE"):
            tags["srmodels.dvc_stage"] = os.environ["DVC_STAGE"]
        run = self._client.create_run(self.experiment_id, run_name=self.stage, tags=tags)
        self.run_id = run.info.run_id
        log.info("MLflow: stage %s is run %s under pipeline run %s (%s)", self.stage, self.run_id,
                 self.parent_run_id, self.uri)

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.params.get("mlflow", {}).get("experiment", DEFAULT_EXPERIMENT)
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location(self.uri))
            except MlflowException:
                exp = self._client.get_experiment_by_name(name)  # another process created it just now
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingUnavailable(
                f"experiment {name!r} (id {exp.experiment_id}) is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or purge it (mlflow gc)")
        return exp.experiment_id

    def _find_parents(self, phash: str) -> list[Any]:
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_KEY}` = {_quote(self.key)} and tags.`{TAG_ROLE}` = 'pipeline' "
                          f"and tags.`{TAG_PARAMS_HASH}` = '{phash}'",
            order_by=["attributes.start_time ASC"], max_results=50)
        runs = [r for r in runs if PARENT_TAG not in r.data.tags]
        # Oldest first, run id as tie-break: every process picks the same one if a race created two.
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _parent(self, code: str, phash: str) -> str:
        found = self._find_parents(phash)
        if found:
            parent = found[0]
            if parent.info.status != "RUNNING":
                self._client.update_run(parent.info.run_id, status="RUNNING")
            self._log_parent_params(parent.info.run_id, parent.data.params)
            return parent.info.run_id
        exp_name = os.environ.get("DVC_EXP_NAME")
        tags = {TAG_ROLE: "pipeline", TAG_KEY: self.key, TAG_PARAMS_HASH: phash, TAG_COMMIT: code}
        if not code.startswith("unknown"):
            tags["mlflow.source.git.commit"] = code.split("+")[0]
        if exp_name:
            tags[TAG_EXP_NAME] = exp_name
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags[TAG_BASELINE] = os.environ["DVC_EXP_BASELINE_REV"]
        run_name = exp_name or f"repro-{code[:7]}{'+dirty' if code.endswith('+dirty') else ''}-{phash[:8]}"
        created = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = created.info.run_id
        winner = self._find_parents(phash)[0]
        if winner.info.run_id != run_id:  # a concurrent stage created one first: use it, drop ours
            self._client.delete_run(run_id)
            run_id = winner.info.run_id
        self._log_parent_params(run_id, {})
        log.info("MLflow: new pipeline run %s (%s, key %s)", run_id, run_name, self.key)
        return run_id

    def _log_parent_params(self, run_id: str, existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        flat = {k: _value(v) for k, v in _flat(pipeline_params(self.params)).items()}
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        clash = [k for k, v in flat.items() if k in existing and existing[k] != v]
        if clash:  # cannot happen while the params hash is in the search; MLflow params are immutable anyway
            log.warning("MLflow: pipeline run %s already has other values for %s; kept the old ones",
                        run_id, ", ".join(clash[:5]))
        for batch in _chunks(new, _PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=batch)

    def _end(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=status)
        # The parent spans several processes: it ends with each stage and is set RUNNING again by the next.
        self._client.set_terminated(self.parent_run_id, status=status)

    # -- guarded calls -----------------------------------------------------------------------------------------
    def _fail(self, action: str, err: BaseException) -> None:
        self.active = False
        if not self._failed:
            self._failed = True
            log.warning("MLflow: could not %s (%s: %s); stage %s continues untracked: its params, metrics, "
                        "artifacts and the pipeline's final metrics are not logged to MLflow", action,
                        type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "",
                        self.stage)

    def _call(self, action: str, fn: Any, what: str = "", count: int = 1) -> bool:
        if not self.active:
            if what:
                self._skipped[what] = self._skipped.get(what, 0) + count
            return False
        try:
            fn()
            return True
        except Exception as err:  # noqa: BLE001 - tracking must never stop the stage
            self._fail(action, err)
            if what:
                self._skipped[what] = self._skipped.get(what, 0) + count
            return False

    # -- public API --------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params of this stage (nested mappings flattened to dotted keys). Re-logging a key with a new value
        is skipped with a warning, because MLflow params are immutable."""
        flat = {k: _value(v) for k, v in _flat(params).items()}
        clash = [k for k, v in flat.items() if k in self._logged_params and self._logged_params[k] != v]
        if clash:
            log.warning("MLflow: params %s already logged for stage %s with other values; kept the first",
                        ", ".join(clash[:5]), self.stage)
        new = {k: v for k, v in flat.items() if k not in self._logged_params}

        def send() -> None:
            from mlflow.entities import Param

            for batch in _chunks([Param(k, v) for k, v in new.items()], _PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=batch)
            self._logged_params.update(new)

        if new:
            self._call("log params", send, "params", len(new))

    def _send_metrics(self, run_id_attr: str, metrics: Mapping[str, Any], step: int | None, what: str) -> None:
        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(_key(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
            for batch in _chunks(items, _METRICS_PER_BATCH):
                self._client.log_batch(getattr(self, run_id_attr), metrics=batch)

        if metrics:
            self._call(f"log {what}", send, what, len(metrics))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics of this stage; pass ``step`` (e.g. the epoch) to draw curves."""
        self._send_metrics("run_id", metrics, step, "metrics")

    def log_parent_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Final metrics on the pipeline's parent run (the row the MLflow UI compares)."""
        self._send_metrics("parent_run_id", metrics, step, "pipeline metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's files) into this stage's artifacts, under ``artifact_path`` if given."""
        path = Path(path)
        if self.active and not path.exists():
            # The caller's mistake, not the store's: skip this one file but keep tracking.
            log.warning("MLflow: artifact %s not logged (no such file)", path)
            return

        def send() -> None:
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

        self._call(f"log artifact {path}", send, "artifacts")

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        """Tags on this stage's run, or on the pipeline's parent run with ``parent=True``."""
        def send() -> None:
            from mlflow.entities import RunTag

            items = [RunTag(_key(k), _value(v)) for k, v in tags.items()]
            for batch in _chunks(items, _PARAMS_PER_BATCH):
                self._client.log_batch(self.parent_run_id if parent else self.run_id, tags=batch)

        if tags:
            self._call("set tags", send, "tags", len(tags))



def start_stage(params: Mapping[str, Any], stage: str, enabled: bool = True) -> StageRun:
    """``with start_stage(params, 'fusion') as run: ...``: the stage's child run under its pipeline's parent.

    ``params`` is the validated params mapping (the whole of it: its hash, less ``mlflow``, identifies the pipeline).
    ``enabled=False`` gives a run that logs nothing (DDP ranks other than 0).
    Never raises because of MLflow; see the module docstring for what happens when the store is unreachable.
    """
    return StageRun(params, stage, enabled)
