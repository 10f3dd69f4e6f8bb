"""MLflow the way a lab runs it: `mlflow server` on PostgreSQL, artifacts stored through the server, the pipeline
talking HTTP to it. `dvc repro` on a tiny profile gives the rows the sqlite store gives (one parent, nested
stages, metrics, data versions, artifacts), SIGTERM leaves them KILLED, a server that dies in the middle of a stage
costs that stage one warning and nothing else, and the UI's link to the experiment (``ui_url``) shows the runs
table with the Dataset and Source cells filled and the headline score (headless Chromium).

PostgreSQL (Debian's postgresql) runs as the postgres user when the tests run as root, in a temporary folder,
on a free port of 127.0.0.1 only; it and every MLflow server are stopped afterwards. `.ci/run` installs it and
psycopg2 (extra 'server'); without them the tests skip, saying so.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from srmodels.tracking import HEADLINE, ui_url

from . import procs
from .helpers import DVC, ROOT, copy_checkout, minimal_params, ran_stages
from .test_tracking import SLEEPER, _communicate

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]
# Debian's PostgreSQL, the newest installed (or $SRMODELS_PG_BIN).
PG_BIN = Path(os.environ.get("SRMODELS_PG_BIN") or max(
    Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: (len(p.parent.name), p.parent.name),
    default="/usr/lib/postgresql"))
MLFLOW = Path(sys.executable).with_name("mlflow")
CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster on 127.0.0.1 holding an empty database 'mlflow'; its URI. Stopped afterwards."""
    if not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL not found in {PG_BIN} (Debian's postgresql; .ci/run installs it)")
    pytest.importorskip("psycopg2", reason="MLflow needs psycopg2 for PostgreSQL (pip install -e '.[server]')")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="srmodels-pg-"))  # not under pytest's folder, which only root may enter
    if as_user:
        shutil.chown(home, "postgres")
    port, db = _free_port(), home / "db"
    ctl = [*as_user, str(PG_BIN / "pg_ctl"), "-D", str(db), "-w", "-t", "60"]
    try:
        procs.run([*as_user, PG_BIN / "initdb", "-D", db, "-U", "srmodels", "--auth=trust", "-E", "UTF8"],
                  timeout=120, check=True)
        procs.run([*ctl, "-l", str(home / "postgres.log"), "-o", f"-h 127.0.0.1 -p {port} -k {home}", "start"],
                  timeout=90, check=True, what="PostgreSQL to start")
        procs.run([PG_BIN / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "srmodels", "mlflow"],
                  timeout=60, check=True)
        yield f"postgresql+psycopg2://srmodels@127.0.0.1:{port}/mlflow"
    finally:
        procs.run([*ctl, "-m", "fast", "stop"], timeout=90)
        shutil.rmtree(home, ignore_errors=True)


class Server:
    """`mlflow server` on PostgreSQL, storing artifacts itself (``--serve-artifacts``), on 127.0.0.1."""

    def __init__(self, backend: str, folder: Path) -> None:
        self.artifacts, self.log = folder / "artifacts", folder / "mlflow-server.log"
        self.url = f"http://127.0.0.1:{_free_port()}"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(MLFLOW), "server", "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination",
                 str(self.artifacts), "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            procs.wait_until(lambda: self.healthy() or self.proc.poll() is not None, timeout=180, interval=0.5,
                             what=f"mlflow server at {self.url}", report=self.tail)
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited {self.proc.returncode}\n{self.tail()}", pytrace=False)
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        procs.kill_group(self.proc)
        self.proc.wait(timeout=30)


def _env(home: Path, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_", "SRMODELS_"))}
    env.update(HOME=str(home), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", MLFLOW_TRACKING_URI=uri)
    return env


def _tiny_params() -> dict:
    """The minimal profile on two members (RFDN and SwinIR's small variants)."""
    p = minimal_params()
    p["trained"] = ["rfdn", "swinir"]
    p["fusion"]["members"] = ["rfdn", "swinir"]
    return p


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    srv = Server(postgres, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """A repository on the tiny profile after `dvc repro` against the server: (repo, env, dvc's output, the id of
    its pipeline run)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    repo = copy_checkout(tmp / "repo", outputs=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(), sort_keys=False))
    env = _env(tmp, server.url)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny profile"]):
        procs.run(cmd, cwd=repo, env=env, timeout=60, check=True)
    done = procs.run([DVC, "repro"], cwd=repo, env=env, timeout=900, check=True, what="dvc repro against the server")
    parent, _ = _rows(_client(server.url))
    return repo, env, done.stdout + done.stderr, parent.info.run_id


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _rows(client, parent_id: str | None = None, names: set[str] | None = None) -> tuple[object, dict[str, object]]:
    """A pipeline run of experiment 'srmodels' (the newest unless named) and its stage runs by name (``names``:
    only those)."""
    exp = client.get_experiment_by_name("srmodels")
    parent = client.get_run(parent_id) if parent_id else client.search_runs(
        [exp.experiment_id], "tags.`srmodels.role` = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {c.info.run_name: c for c in children if names is None or c.info.run_name in names}


def _shape(client, run) -> dict:
    """What a run holds, less the values that differ between two runs of the same work."""
    return {"status": run.info.status, "metrics": sorted(run.data.metrics), "params": sorted(run.data.params),
            "tags": sorted(k for k in run.data.tags if not k.startswith("mlflow.log-model")),
            "artifacts": sorted(f.path for f in client.list_artifacts(run.info.run_id)),
            "inputs": sorted((i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs)}


def test_pipeline_rows_on_the_server(pipeline, server, tmp_path):
    repo, env, out, parent_id = pipeline
    client = _client(server.url)
    parent, stages = _rows(client, parent_id)
    assert set(stages) == ran_stages(out) == set(_lock(repo))  # every stage, nested under one parent
    assert parent.info.status == "FINISHED" and {s.info.status for s in stages.values()} == {"FINISHED"}
    head = procs.run(["git", "rev-parse", "HEAD"], cwd=repo, timeout=30, check=True).stdout.strip()
    assert parent.data.tags["mlflow.source.git.commit"] == head and parent.data.tags["mlflow.source.name"] == "dvc.yaml"
    assert stages["fusion"].data.tags["mlflow.source.name"] == "stages/fusion.py"
    score = json.loads((repo / "data/score/metrics.json").read_text())
    assert parent.data.metrics[HEADLINE[0]] == score["sets"]["test"]["fusion"]["psnr_y"]
    curve = client.get_metric_history(stages["fusion"].info.run_id, "val_psnr")
    assert sorted(m.step for m in curve) == [0, 1]  # epoch 0 (the start) and the profile's one epoch
    # Data versions: the fusion's run names the caches at the md5 dvc.lock holds; the parent the prepared data.
    lock = _lock(repo)
    inputs = {i.dataset.name: i.dataset.digest for i in stages["fusion"].inputs.dataset_inputs}
    assert inputs["data/cache/rfdn"] == lock["cache@rfdn"]["outs"][0]["md5"]
    prepared = {o["path"]: o["md5"] for o in lock["prepare"]["outs"]}
    sources = {i.dataset.name: i.dataset.digest for i in parent.inputs.dataset_inputs}
    assert sources.items() <= prepared.items() and "data/prepared/val" in sources
    # Artifacts went through the server into its own store, and come back whole.
    got = client.download_artifacts(stages["score"].info.run_id, "per_image.csv", str(tmp_path))
    assert Path(got).read_bytes() == (repo / "data/score/per_image.csv").read_bytes()
    assert list(server.artifacts.rglob("per_image.csv"))


def test_server_rows_match_sqlite_rows(pipeline, server):
    """Two stages re-run against a sqlite store hold what the same stages hold on the server."""
    repo, env, _, parent_id = pipeline
    sqlite = f"sqlite:///{repo / 'mlflow.db'}"
    procs.run([DVC, "repro", "--force", "-s", "baselines", "score"], cwd=repo, timeout=600, check=True,
              env={**env, "MLFLOW_TRACKING_URI": sqlite})
    names = {"baselines", "score"}
    srv_parent, srv = _rows(_client(server.url), parent_id, names)
    sql_parent, sql = _rows(_client(sqlite), None, names)
    assert set(sql) == names
    for name in names:
        assert _shape(_client(sqlite), sql[name]) == _shape(_client(server.url), srv[name]), name
    # The server's pipeline run also holds what the stages not re-run here logged on it.
    assert {k: srv_parent.data.metrics.get(k) for k in sql_parent.data.metrics} == sql_parent.data.metrics
    assert sorted(sql_parent.data.params) == sorted(srv_parent.data.params)


def test_sigterm_marks_server_runs_killed(pipeline, server):
    repo, env, _, _ = pipeline
    params = {**_tiny_params(), "mlflow": {"tracking_uri": server.url, "experiment": "t-sigterm"}}
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, json.dumps(params)], cwd=repo, text=True,
                            env={**env, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not select.select([proc.stdout], [], [], 60)[0]:  # the stage is inside its MLflow run once it prints
        _communicate(proc, 1, "the stage to start its MLflow run")
    line = proc.stdout.readline()
    assert line, _communicate(proc, 60, "the stage to start")[1]
    ids = json.loads(line)
    proc.send_signal(signal.SIGTERM)
    _, err = _communicate(proc, 60, "the stage to stop on SIGTERM")
    assert proc.returncode == 143, err
    client = _client(server.url)
    assert client.get_run(ids["run"]).info.status == client.get_run(ids["parent"]).info.status == "KILLED"


def test_server_dying_mid_stage_costs_one_warning(pipeline, postgres, tmp_path):
    """The server is killed once the fusion stage's run exists: the stage finishes with the same outputs."""
    repo, env, _, _ = pipeline
    before = (_lock(repo)["fusion"]["outs"], (repo / "data/fusion/metrics.json").read_bytes())
    doomed = Server(postgres, tmp_path)
    client = _client(doomed.url)
    exp_id = client.get_experiment_by_name("srmodels").experiment_id
    stage = subprocess.Popen([DVC, "repro", "--force", "-s", "fusion"], cwd=repo, env={**env, "MLFLOW_TRACKING_URI":
                             doomed.url}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        procs.wait_until(lambda: client.search_runs([exp_id], "attributes.run_name = 'fusion' and "
                                                    "attributes.status = 'RUNNING'") or stage.poll() is not None,
                         timeout=300, interval=0.1, what="the fusion stage's MLflow run")
        assert stage.poll() is None, "the stage ended before the server could be killed"
    except BaseException:
        procs.kill_group(stage)
        raise
    finally:
        doomed.stop()
    out, _ = _communicate(stage, 600, "the fusion stage without its server")
    assert stage.returncode == 0, out
    warnings = [line for line in out.splitlines() if "WARNING" in line and "mlflow" in line.lower()]
    assert len(warnings) == 1 and doomed.url in warnings[0], out
    assert (_lock(repo)["fusion"]["outs"], (repo / "data/fusion/metrics.json").read_bytes()) == before


def _chromium(url: str, *args: str, tmp: Path) -> str:
    return procs.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run",
                      f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=15000", *args, url],
                     timeout=120, check=True, what=f"chromium on {url}").stdout


def test_ui_shows_the_runs_table_with_data_source_model_and_score(pipeline, server, tmp_path):
    """The experiment's saved view (``ui_url``) in headless Chromium: the pipeline's row with its data versions,
    its source and its headline scores."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (Debian's chromium; .ci/run installs it)")
    _, _, _, parent_id = pipeline
    client = _client(server.url)
    parent = client.get_run(parent_id)
    url = ui_url(server.url, parent.info.experiment_id)
    dom = _chromium(url, "--window-size=2400,800", "--dump-dom", tmp=tmp_path)
    _chromium(url, "--window-size=2400,800", f"--screenshot={tmp_path / 'runs.png'}", tmp=tmp_path)
    assert (tmp_path / "runs.png").stat().st_size > 0
    assert "matching runs" in dom and parent.info.run_name in dom, "the runs table is not shown"
    assert "data/prepared/val" in dom, "the Dataset cell is empty"
    assert "dvc.yaml" in dom, "the Source cell is empty"
    assert ">srmodels-ensemble<" in dom, "the Models cell does not show the registered ensemble"
    assert HEADLINE[0] in dom and f">{parent.data.metrics[HEADLINE[0]]}<" in dom, "the headline score is not shown"
