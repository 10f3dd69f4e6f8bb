"""srmodels.tracking: one parent per pipeline run, stages as children, and never a failed stage because of MLflow.

One sqlite store per module, a copy of conftest's empty_mlflow_db (creating an MLflow database runs its
migrations, seconds each); every test uses its own MLflow experiment in it, so the tests do not see each other's
runs. Tests that need separate processes start them concurrently where they can, because each pays the mlflow
import.
"""
from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srmodels.core import layout, provenance
from srmodels.core.layout import artifact_location, tracking_uri
from srmodels.core.provenance import git_commit as code_version, params_hash, pipeline_key
from srmodels.tracking import TAG_COMMIT, TAG_KEY, StageRun, pipeline_params

from .helpers import ROOT

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
def store(tmp_path_factory, empty_mlflow_db) -> Path:
    """The 'repository root' holding mlflow.db (a copy of conftest's empty store) and mlartifacts/ for the whole
    module."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    return root


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
from srmodels.tracking import StageRun
params = json.loads(sys.argv[1])
with StageRun(params, sys.argv[2]) as run:
    run.log_params(params["fusion"])
    for epoch in range(3):
        run.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
print(json.dumps({"run": run.run_id, "parent": run.parent_run_id, "active": run.active}))
"""


@pytest.mark.slow  # stage processes against a real MLflow store
def test_two_processes_same_key_share_one_parent(env, store, client):
    params = make_params("t-processes")
    proc_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, json.dumps(params), "prepare"], cwd=env,
                         env=proc_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout.strip().splitlines()[-1])
    assert first["active"] and first["parent"]

    # The second stage is this (pytest) process: a different process that knows nothing of the first.
    with StageRun(params, "finetune@dat") as run:
        run.log_metrics({"val_psnr_y": 20.5}, step=0)
        run.log_metrics({"test.psnr_y": 27.25}, parent=True)
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


# A stand-in for `dvc repro` (its file is named `dvc`, so its command line reads `python .../dvc ...` like the real
# one's): runs the stages one after another as child processes (forked, so that only this process pays the
# imports); `dirty` rewrites a git-tracked `cache: false` output and dvc.lock between two stages, as DVC does.
FAKE_DVC = """
import json, os, pathlib, sys, traceback
from mlflow import MlflowClient  # noqa: F401 - imported once, before the forks
from srmodels.tracking import StageRun
params = json.loads(sys.argv[1])
for step in sys.argv[2:]:
    if step == "dirty":
        pathlib.Path("data/score/metrics.json").write_text('{"psnr_y": 2}\\n')
        pathlib.Path("dvc.lock").write_text("schema: '2.0'\\nstages: {}\\n")
    elif os.fork() == 0:
        code = 1
        try:
            with StageRun(params, step) as run:
                run.log_metrics({"loss": 0.5}, step=0)
            print(json.dumps({"run": run.run_id, "parent": run.parent_run_id, "active": run.active}), flush=True)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    elif os.wait()[1]:
        sys.exit(f"stage {step} failed")
"""


def git_repo(path: Path) -> str:
    """A git checkout holding a tracked DVC output; returns HEAD."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (path / "data" / "score").mkdir(parents=True)
    (path / "data" / "score" / "metrics.json").write_text('{"psnr_y": 1}\n')
    (path / "dvc.lock").write_text("schema: '2.0'\n")
    (path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "init")
    return git("rev-parse", "HEAD")


def _communicate(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """``proc.communicate`` bounded in time: on a timeout the child is killed and the test fails, saying what it
    waited for and what the child printed."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n{out[-2000:]}\n{err[-2000:]}", pytrace=False)


@pytest.mark.slow  # stage processes against a real MLflow store
def test_one_parent_per_dvc_invocation(env, store, client, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sha = git_repo(repo)
    dvc = tmp_path / "bin" / "dvc"
    dvc.parent.mkdir()
    dvc.write_text(FAKE_DVC)
    params = make_params("t-dvc")
    proc_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Two invocations at the same commit with the same params; the first dirties the tree half way through.
    runs = [subprocess.Popen([sys.executable, str(dvc), json.dumps(params), *steps], cwd=repo, env=proc_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for steps in (["prepare", "dirty", "score"], ["prepare"])]
    outs = [_communicate(r, 120, "the fake `dvc repro`") for r in runs]
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0, err
    (prepare, score), (other,) = [[json.loads(line) for line in out.splitlines()] for out, _ in outs]
    assert prepare["active"] and prepare["parent"] == score["parent"]
    assert other["parent"] != prepare["parent"]

    parents, children = runs_of(client, "t-dvc")
    assert len(parents) == 2 and len(children) == 3
    parent = client.get_run(prepare["parent"])
    assert parent.info.run_name == f"repro-{sha[:7]}-{params_hash(pipeline_params(params))[:8]}"
    assert parent.data.tags[TAG_KEY].startswith(f"{sha}-dvc-")
    assert parent.info.status == "FINISHED"
    assert "fusion.lr" in parent.data.params and not any(k.startswith("mlflow.") for k in parent.data.params)
    # The tree did turn dirty between the stages, and that did not split the pipeline run.
    assert client.get_run(prepare["run"]).data.tags[TAG_COMMIT] == sha
    assert client.get_run(score["run"]).data.tags[TAG_COMMIT] == sha + "+dirty"


def test_pipeline_key(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setattr(provenance, "dvc_invocation", lambda: None)
    assert pipeline_key("abc+dirty", "1234") == "abc+dirty-1234"            # a stage run by hand
    monkeypatch.setattr(provenance, "dvc_invocation", lambda: "42.1000.deadbeef")
    assert pipeline_key("abc+dirty", "1234") == "abc-dvc-42.1000.deadbeef"  # under dvc repro
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-lynx")
    assert pipeline_key("abc", "1234") == "gusty-lynx"


@pytest.mark.parametrize("argv, is_dvc", [
    (["/usr/bin/dvc", "repro"], True), (["/v/bin/python3", "/v/bin/dvc", "repro"], True),
    (["python", "-m", "dvc", "exp", "run"], True), (["python", "stages/finetune.py", "dvc"], False),
    (["python", "-m", "pytest"], False), ([""], False)])
def test_dvc_command_lines(argv, is_dvc):
    assert provenance.is_dvc_command(argv) is is_dvc


def test_mlflow_section_is_not_part_of_the_pipeline(env, store, client, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    with StageRun(make_params("t-section", uri="sqlite:///elsewhere.db"), "prepare") as a:
        pass
    with StageRun(make_params("t-section"), "fusion") as b:
        pass
    assert a.active and a.parent_run_id == b.parent_run_id


# A stage that waits to be stopped; SIGINT gets Python's default handler back even if started from a background job.
SLEEPER = """
import json, logging, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from srmodels.tracking import StageRun
with StageRun(json.loads(sys.argv[1]), "fusion") as run:
    print(json.dumps({"run": run.run_id, "parent": run.parent_run_id}), flush=True)
    time.sleep(60)
"""


@pytest.mark.slow  # stage processes against a real MLflow store
def test_signals_mark_runs_killed(env, client):
    client.search_experiments(max_results=1)  # the store exists: the children's stderr holds only their own lines
    proc_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    sigs = {signal.SIGTERM: 143, signal.SIGINT: 130}
    procs = {sig: subprocess.Popen([sys.executable, "-c", SLEEPER, json.dumps(make_params(f"t-{sig.name}"))],
                                   cwd=env, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sig in sigs}
    for sig, proc in procs.items():
        if not select.select([proc.stdout], [], [], 60)[0]:  # the stage is inside `with StageRun(...)` now
            _communicate(proc, 1, "the stage to start its MLflow run")
        line = proc.stdout.readline()
        assert line, proc.communicate()[1]
        ids = json.loads(line)
        proc.send_signal(sig)
        out, err = _communicate(proc, 60, f"the stage to stop on {sig.name}")
        assert proc.returncode == sigs[sig], err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"stopped by {sig.name}" in lines[0], err  # no traceback, one line
        assert client.get_run(ids["run"]).info.status == "KILLED"
        assert client.get_run(ids["parent"]).info.status == "KILLED"


def test_signal_handlers_are_restored(env):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StageRun(make_params("t-handlers"), "prepare") as run:
        assert signal.getsignal(signal.SIGTERM) not in before
    assert run.active
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_different_params_get_different_parents(env, client):
    a, b = make_params("t-params", seed=0), make_params("t-params", seed=1)
    with StageRun(a, "prepare") as run_a:
        pass
    with StageRun(b, "prepare") as run_b:
        pass
    with StageRun(a, "fusion") as run_a2:
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
        with StageRun(params, stage) as run:
            run.set_tags({"note": stage})
    monkeypatch.setenv("DVC_EXP_NAME", "other-exp")
    with StageRun(params, "prepare") as other:
        pass
    assert other.parent_run_id != run.parent_run_id

    parents, children = runs_of(client, "t-exp")
    assert sorted(p.info.run_name for p in parents) == ["gusty-lynx", "other-exp"]
    parent = next(p for p in parents if p.info.run_name == "gusty-lynx")
    assert parent.data.tags[TAG_KEY] == "gusty-lynx"
    assert parent.data.tags["srmodels.dvc_exp_name"] == "gusty-lynx"
    assert parent.data.tags["srmodels.dvc_baseline_rev"] == "0123456789abcdef"
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert sorted(c.info.run_name for c in mine) == ["cache@dat", "prepare", "score"]
    assert {c.data.tags["note"] for c in mine} == {"prepare", "cache@dat", "score"}


def test_many_long_and_oddly_named_values_are_all_logged(env, client):
    params = {**{f"p{i}": i for i in range(250)}, "long": "x" * 10000, "finetune@dat": {"lr": 1}}
    with StageRun(make_params("t-batch"), "prepare") as run:
        run.log_params(params)
        run.log_metrics({f"m{i}": i for i in range(250)}, step=3)
        run.set_tags({"note": "y" * 10000}, parent=True)
    assert run.active
    child = client.get_run(run.run_id).data
    assert sum(k.startswith("p") for k in child.params) == 250 and child.metrics["m249"] == 249
    assert len(child.params["long"]) == 6000 and child.params["finetune_dat.lr"] == "1"
    assert [m.step for m in client.get_metric_history(run.run_id, "m0")] == [3]
    assert len(client.get_run(run.parent_run_id).data.tags["note"]) == 6000


# The pipeline's entry point: a stage's run carries the machine it ran on.
TRACKED_STAGE = """
import json, sys
from stages import _common
with _common.tracked(json.loads(sys.argv[1]), "score") as run:
    run.log_metrics({"test.psnr_y": 30.0}, parent=True)
print(json.dumps({"run": run.run_id, "parent": run.parent_run_id}))
"""


@pytest.mark.slow  # stage processes against a real MLflow store
def test_stage_runs_carry_the_machine_provenance(env, client, tmp_path):
    (tmp_path / "params.yaml").write_text("cpu_isa: native\n")
    proc_env = {**os.environ, "PYTHONPATH": str(ROOT), "SRMODELS_PARAMS": str(tmp_path / "params.yaml")}
    out = subprocess.run([sys.executable, "-c", TRACKED_STAGE, json.dumps(make_params("t-machine"))], cwd=env, env=proc_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    tags = client.get_run(ids["run"]).data.tags
    assert tags["srmodels.cpu_isa"] == "native" and tags["srmodels.torch"] and tags["srmodels.aten_capability"]
    assert tags["srmodels.role"] == "stage" and tags["srmodels.stage"] == "score"
    assert client.get_run(ids["parent"]).data.metrics["test.psnr_y"] == 30.0


def test_unreachable_server_warns_once_and_stage_completes(env, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    artifact = tmp_path / "plot.png"
    artifact.write_bytes(b"not really a png")
    done = False
    import mlflow  # noqa: F401 - time the tracking calls, not the (load-dependent) import
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="srmodels.tracking"):
        with StageRun(make_params("t-down"), "fusion") as run:
            run.log_params({"lr": 1e-3})
            for epoch in range(5):
                run.log_metrics({"loss": 0.1}, step=epoch)
            run.log_artifact(artifact)
            run.log_metrics({"test.psnr_y": 1.0}, parent=True)
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
    with StageRun(make_params("t-artifacts"), "test") as run:
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
        with StageRun(make_params("t-fail"), "fusion") as run:
            1 / 0
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.parent_run_id).info.status == "FAILED"
    with StageRun(make_params("t-fail"), "fusion") as again:  # the rerun reopens and finishes the parent
        pass
    assert again.parent_run_id == run.parent_run_id
    assert client.get_run(run.parent_run_id).info.status == "FINISHED"


def test_tracking_off_writes_nothing(env, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        with StageRun(make_params("t-off", uri="none"), "prepare") as run:
            run.log_metrics({"x": 1.0})
    assert not run.active and not caplog.records
    assert not (tmp_path / "cwd" / "mlflow.db").exists()


def test_disabled_stage_logs_nothing(env, client):
    # DDP ranks other than 0: same code path, nothing reaches the store.
    params = make_params("t-rank1")
    with StageRun(params, "finetune@dat", enabled=False) as run:
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
    assert layout.repo_root() == root


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


# A DVC pipeline's definition and lock after `prepare` and `train@x` ran: `score` reads a folder holding two outputs
# and one output of a stage that reads prepared data (not source data); `raw` and code.py come from outside.
DVC_YAML = """
stages:
  prepare: {cmd: 'true', deps: [raw], outs: [data/prepared/a, data/prepared/b]}
  train:
    foreach: [x]
    do: {cmd: 'true', deps: [data/prepared/a, code.py], outs: ['data/train/${item}']}
  score: {cmd: 'true', deps: [data/prepared, data/train/x, code.py], outs: [data/score]}
"""
DVC_LOCK = """
schema: '2.0'
stages:
  prepare:
    cmd: 'true'
    deps: [{path: raw, hash: md5, md5: 00000000000000000000000000000000.dir}]
    outs: [{path: data/prepared/a, hash: md5, md5: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir},
           {path: data/prepared/b, hash: md5, md5: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb}]
  train@x:
    cmd: 'true'
    deps: [{path: data/prepared/a, hash: md5, md5: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir}]
    outs: [{path: data/train/x, hash: md5, md5: cccccccccccccccccccccccccccccccc}]
"""


def _inputs(client, run_id: str) -> dict[str, tuple[str, str]]:
    """A run's dataset inputs: name -> (digest, context)."""
    return {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
            for i in client.get_run(run_id).inputs.dataset_inputs}


def test_runs_list_the_data_versions_they_read(env, client, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=env, check=True, timeout=30)
    (env / ".dvc").mkdir()
    (env / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (env / "dvc.yaml").write_text(DVC_YAML)
    (env / "dvc.lock").write_text(DVC_LOCK)
    monkeypatch.setenv("DVC_STAGE", "score")
    with StageRun(make_params("t-data"), "score") as score:
        pass
    monkeypatch.setenv("DVC_STAGE", "train@x")
    with StageRun(make_params("t-data"), "train@x") as train:
        pass
    a, b, x = "a" * 32 + ".dir", "b" * 32, "c" * 32
    assert _inputs(client, score.run_id) == {"data/prepared/a": (a, "input"), "data/prepared/b": (b, "input"),
                                             "data/train/x": (x, "input")}
    assert _inputs(client, train.run_id) == {"data/prepared/a": (a, "input")}
    # The pipeline's row: the source data once, however many stages read it.
    assert _inputs(client, score.parent_run_id) == {"data/prepared/a": (a, "source"), "data/prepared/b": (b, "source")}
    dataset = client.get_run(score.run_id).inputs.dataset_inputs[0].dataset
    assert json.loads(dataset.source)["dvc_stage"] == "prepare" and dataset.source_type == "dvc"
    exp = client.get_experiment_by_name("t-data")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table, not GenAI traces
    view = json.loads(json.loads(exp.tags["mlflow.sharedViewState.scores"])["state"])
    assert {"attributes.`Dataset`", "metrics.`test.fusion.psnr_y`"} <= set(view["selectedColumns"])
    tags = client.get_run(score.parent_run_id).data.tags
    assert tags["mlflow.source.name"] == "dvc.yaml" and tags["mlflow.source.type"] == "LOCAL"


def test_a_stage_outside_its_pipeline_logs_no_data_versions(env, client, caplog):
    (env / "dvc.lock").write_text(DVC_LOCK)  # a lock, but no DVC repository: the stage is tracked all the same
    with caplog.at_level(logging.INFO, logger="srmodels.tracking"):
        with StageRun(make_params("t-nodata"), "score") as run:
            run.log_metrics({"x": 1.0})
    assert run.active and client.get_run(run.run_id).data.metrics["x"] == 1.0
    assert not client.get_run(run.run_id).inputs.dataset_inputs
    assert any("no data versions for stage score" in r.getMessage() for r in caplog.records)
