"""srmodels.tracking: one parent per pipeline run, stages as children, and never a failed stage because of MLflow.

One sqlite store per module (creating an MLflow database runs its migrations, seconds each); every test uses its
own MLflow experiment in it, so the tests do not see each other's runs. Only the first test pays a subprocess.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srmodels import tracking
from srmodels.tracking import (TAG_EXP_NAME, TAG_KEY, artifact_location, code_version, start_stage,
                               tracking_uri)

ROOT = Path(__file__).resolve().parents[1]
# MLflow's own SQLAlchemy usage warns on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")
ENV_VARS = ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def make_params(experiment: str, seed: int = 0, uri: str = "sqlite:///mlflow.db") -> dict:
    """A small params mapping: tracking reads only the mlflow section and hashes/flattens the rest."""
    return {"seed": seed, "scale": 4, "data": {"test": ["chelsea", "coffee"], "benchmarks": {}},
            "fusion": {"members": ["dat", "swinir"], "lr": 1.0e-3, "kind": "pixel"},
            "mlflow": {"tracking_uri": uri, "experiment": experiment}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The 'repository root' holding mlflow.db and mlartifacts/ for the whole module."""
    return tmp_path_factory.mktemp("repo")


@pytest.fixture
def env(store, tmp_path, monkeypatch) -> Path:
    """A clean environment: DVC_ROOT -> store, cwd outside any git checkout (commit 'unknown', stable)."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(store))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="module")
def client(store):
    from mlflow import MlflowClient  # the tests read back what was logged; the package itself never does this

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def runs_of(client, experiment: str) -> tuple[list, list]:
    """(parents, children) of an experiment."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


STAGE_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
from srmodels.tracking import start_stage
params = json.loads(sys.argv[1])
with start_stage(params, sys.argv[2]) as run:
    run.log_params(params["fusion"])
    for epoch in range(3):
        run.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
print(json.dumps({"run": run.run_id, "parent": run.parent_run_id, "active": run.active}))
"""


def test_two_processes_same_key_share_one_parent(env, store, client):
    params = make_params("t-processes")
    proc_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, json.dumps(params), "prepare"], cwd=env,
                         env=proc_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout.strip().splitlines()[-1])
    assert first["active"] and first["parent"]

    # The second stage is this (pytest) process: a different process that knows nothing of the first.
    with start_stage(params, "finetune@dat") as run:
        run.log_metrics({"val_psnr_y": 20.5}, step=0)
        run.log_parent_metrics({"test.psnr_y": 27.25})
    assert run.parent_run_id == first["parent"]

    parents, children = runs_of(client, "t-processes")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_name for c in children} == {"prepare", "finetune@dat"}
    assert parent.info.run_name.startswith("repro-")
    assert parent.data.tags[TAG_KEY].startswith("unknown-")       # cwd is outside git
    assert parent.data.params["fusion.lr"] == "0.001"             # flattened params on the parent
    assert parent.data.params["data.test"] == "['chelsea', 'coffee']"
    assert parent.data.metrics["test.psnr_y"] == 27.25
    assert parent.info.status == "FINISHED"
    prepare = next(c for c in children if c.info.run_name == "prepare")
    assert [m.step for m in client.get_metric_history(prepare.info.run_id, "loss")] == [0, 1, 2]
    assert prepare.data.params["members"] == "['dat', 'swinir']"


def test_different_params_get_different_parents(env, client):
    a, b = make_params("t-params", seed=0), make_params("t-params", seed=1)
    with start_stage(a, "prepare") as run_a:
        pass
    with start_stage(b, "prepare") as run_b:
        pass
    with start_stage(a, "fusion") as run_a2:
        pass
    assert run_a.parent_run_id != run_b.parent_run_id
    assert run_a2.parent_run_id == run_a.parent_run_id
    parents, children = runs_of(client, "t-params")
    assert len(parents) == 2 and len(children) == 3


def test_dvc_exp_name_groups_stages(env, client, monkeypatch):
    params = make_params("t-exp")
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-lynx")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    for stage in ("prepare", "cache@dat", "score"):
        with start_stage(params, stage) as run:
            run.set_tags({"note": stage})
    monkeypatch.setenv("DVC_EXP_NAME", "other-exp")
    with start_stage(params, "prepare") as other:
        pass
    assert other.parent_run_id != run.parent_run_id

    parents, children = runs_of(client, "t-exp")
    assert sorted(p.info.run_name for p in parents) == ["gusty-lynx", "other-exp"]
    parent = next(p for p in parents if p.info.run_name == "gusty-lynx")
    assert parent.data.tags[TAG_KEY] == "gusty-lynx"
    assert parent.data.tags[TAG_EXP_NAME] == "gusty-lynx"
    assert parent.data.tags["srmodels.dvc_baseline_rev"] == "0123456789abcdef"
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert sorted(c.info.run_name for c in mine) == ["cache@dat", "prepare", "score"]


def test_unreachable_server_warns_once_and_stage_completes(env, caplog, tmp_path):
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # restored by the env fixture's monkeypatch.delenv
    artifact = tmp_path / "plot.png"
    artifact.write_bytes(b"not really a png")
    done = False
    import mlflow  # noqa: F401 - time the tracking calls, not the (load-dependent) import
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="srmodels.tracking"):
        with start_stage(make_params("t-down"), "fusion") as run:
            run.log_params({"lr": 1e-3})
            for epoch in range(5):
                run.log_metrics({"loss": 0.1}, step=epoch)
            run.log_artifact(artifact)
            run.log_parent_metrics({"test.psnr_y": 1.0})
            done = True
    elapsed = time.monotonic() - start
    assert done and not run.active and run.run_id is None
    assert elapsed < 15, f"an unreachable server took {elapsed:.1f}s"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "http://127.0.0.1:9" in warnings[0].getMessage() and "fusion" in warnings[0].getMessage()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    summary = [r.getMessage() for r in caplog.records if "not logged for stage" in r.getMessage()]
    assert summary and "5 metrics" in summary[0] and "1 artifacts" in summary[0]


def test_artifacts_land_under_the_repo_root_from_elsewhere(env, store, client, tmp_path):
    plot = tmp_path / "curve.png"
    plot.write_bytes(b"\x89PNG fake")
    with start_stage(make_params("t-artifacts"), "test") as run:
        run.log_artifact(plot)
        run.log_artifact(tmp_path / "missing.md")  # the caller's mistake: warned, skipped, tracking goes on
        run.log_metrics({"psnr_y": 28.0})
    assert run.active
    exp = client.get_experiment_by_name("t-artifacts")
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    stored = store / "mlartifacts" / run.run_id / "artifacts" / "curve.png"
    assert stored.read_bytes() == b"\x89PNG fake"
    assert [f.path for f in client.list_artifacts(run.run_id)] == ["curve.png"]
    assert not any(env.iterdir()), "nothing may be written to the current directory"
    assert client.get_run(run.run_id).data.metrics["psnr_y"] == 28.0


def test_stage_error_propagates_and_marks_runs_failed(env, client):
    with pytest.raises(ZeroDivisionError):
        with start_stage(make_params("t-fail"), "fusion") as run:
            1 / 0
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.parent_run_id).info.status == "FAILED"
    with start_stage(make_params("t-fail"), "fusion") as again:  # the rerun reopens and finishes the parent
        pass
    assert again.parent_run_id == run.parent_run_id
    assert client.get_run(run.parent_run_id).info.status == "FINISHED"


def test_tracking_off_writes_nothing(env, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        with start_stage(make_params("t-off", uri="none"), "prepare") as run:
            run.log_metrics({"x": 1.0})
    assert not run.active and not caplog.records
    assert not (tmp_path / "cwd" / "mlflow.db").exists()


def test_disabled_stage_logs_nothing(env, client):
    # DDP ranks other than 0: same code path, nothing reaches the store.
    params = make_params("t-rank1")
    with start_stage(params, "finetune@dat", enabled=False) as run:
        run.log_params({"a": 1})
        run.log_metrics({"x": 1.0}, 1)
    assert not run.active and run.run_id is None
    assert client.get_experiment_by_name("t-rank1") is None


def test_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path.resolve()
    params = make_params("x")
    assert tracking_uri(params, root) == f"sqlite:///{root}/mlflow.db"
    assert tracking_uri(make_params("x", uri="sqlite:////abs/db.sqlite"), root) == "sqlite:////abs/db.sqlite"
    assert tracking_uri(make_params("x", uri="mlruns"), root) == (root / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(params, root) == "http://mlflow:5000"
    assert artifact_location("http://mlflow:5000") is None
    assert artifact_location("sqlite:////abs/db.sqlite") == "file:///abs/mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/t.db?timeout=30")
    assert tracking_uri(params, root) == f"sqlite:///{root}/sub/t.db?timeout=30"
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert tracking.repo_root() == root


def test_code_version_ignores_dvc_bookkeeping(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("a\n")
    (tmp_path / ".gitignore").write_text("/data\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "init")
    clean = code_version(tmp_path)
    assert len(clean) == 40
    # dvc repro rewrites dvc.lock (and .gitignore) after every stage: still the same pipeline run
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / ".gitignore").write_text("/data\n/out\n")
    assert code_version(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == clean + "+dirty"
