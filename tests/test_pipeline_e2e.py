"""The whole DVC pipeline end to end on a minimal profile, in a throwaway git repo.

One repository goes through the life a lab gives it, in order:
- a first `dvc repro` runs every stage (a benchmark set included) under ONE MLflow parent run;
- tracking settings invalidate nothing; replacing an input (a pretrained checkpoint, a benchmark image, a
  file of the DIV2K root) marks exactly the stage that reads it;
- a stage that fails ends in one line and leaves its previous outputs byte for byte; a cut cache file is named;
- `dvc exp run -S fusion.epochs=N` in the workspace, with `--temp` and queued (`dvc queue start -j 2`) re-run
  only fusion, test and score, and `git checkout` + `dvc checkout` bring the workspace back to clean;
- a forced re-run of everything gives byte-identical metrics files, curves and PNGs.
"""
import hashlib
import json
import re
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from srmodels.data.images import write_image

from . import procs
from .helpers import DVC, ROOT, copy_checkout, minimal_params, ran_stages

UP_TO_DATE = "Data and pipelines are up to date."
DOWNSTREAM = ("fusion", "test", "score", "ensemble")
UPSTREAM = ("prepare", "benchmark@mini", "finetune@dat", "finetune@swinir", "finetune@rfdn", "cache@dat",
            "cache@swinir", "cache@rfdn", "baselines")

pytestmark = pytest.mark.slow


def _e2e_params() -> dict:
    """The minimal profile (helpers.minimal_params) with a benchmark set and DAT's small variant."""
    p = minimal_params()
    p["data"]["benchmarks"] = {"mini": "bench"}
    p["backbones"]["dat"]["variant"] = "dat_small"
    return p


def _run_in(cmd: list[str], cwd: Path, env: dict, ok: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    return procs.run(cmd, cwd=cwd, env=env, timeout=timeout, check=ok)


def _out(cmd: list[str], cwd: Path, env: dict) -> str:
    res = _run_in(cmd, cwd, env)
    return res.stdout + res.stderr


def _digests(repo: Path) -> dict[str, str]:
    files = [*sorted((repo / "data").rglob("metrics.json")), *sorted((repo / "data").rglob("curve.csv")),
             *sorted((repo / "data/test").rglob("*.png")), *sorted((repo / "data/score").rglob("*.png")),
             repo / "data/score/per_image.csv", repo / "data/score/table.md"]
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _wait_for_queue(repo: Path, env: dict, names: list[str], timeout: float) -> None:
    """Wait until DVC's queue has run ``names``, all successfully. On a timeout or a failure: the queue's status
    and each task's log, then the workers are stopped (a hung worker must not outlive the test)."""
    def status() -> str:
        return _run_in([DVC, "queue", "status"], repo, env, timeout=60).stdout

    def report() -> str:
        logs = [f"--- dvc queue logs {name} ---\n" + _run_in([DVC, "queue", "logs", name], repo, env, ok=False,
                                                          timeout=60).stdout[-3000:] for name in names]
        _run_in([DVC, "queue", "stop", "--kill"], repo, env, ok=False, timeout=60)
        return "--- dvc queue status ---\n" + status() + "\n".join(logs)

    procs.wait_until(lambda: not any(word in status() for word in ("Queued", "Running")), timeout=timeout,
                     what=f"dvc queue to run {', '.join(names)}", report=report, interval=3)
    final = status()
    if "Failed" in final or final.count("Success") < len(names):
        pytest.fail(f"queued experiments did not all succeed\n{report()}", pytrace=False)
    _run_in([DVC, "queue", "stop"], repo, env, ok=False, timeout=60)  # an idle worker must not outlive the test


def _status(repo: Path, env: dict) -> str:
    return _out([DVC, "status"], repo, env).strip()


def _parents(repo: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("srmodels")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("srmodels.role") == "pipeline"]
    children = {p.info.run_id: sorted(r.data.tags.get("srmodels.stage", "") for r in runs
                                      if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) for p in parents}
    return [(p.info.run_name, p.info.status, children[p.info.run_id]) for p in parents]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pipeline")
    copy_checkout(repo, outputs=False)  # start without any committed outputs or lock
    (repo / "params.yaml").write_text(yaml.safe_dump(_e2e_params(), sort_keys=False))
    rng = np.random.default_rng(3)
    for i in range(2):  # a benchmark set of two smooth 96x96 images, LR made by the stage
        img = np.clip(rng.normal(128, 40, (12, 12, 3)), 0, 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
        write_image(repo / "bench" / "HR" / f"b{i}.png", img)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for key in ("DVC_EXP_NAME", "SRMODELS_PARAMS", "SRMODELS_DEBUG"):
        env.pop(key, None)
    _run_in(["git", "init", "-q"], repo, env)
    _run_in(["git", "add", "-A"], repo, env)
    _run_in(["git", "commit", "-qm", "minimal profile"], repo, env)
    out = _out([DVC, "repro"], repo, env)
    _run_in(["git", "add", "-A"], repo, env)
    _run_in(["git", "commit", "-qm", "results"], repo, env)
    return repo, env, out


def test_all_stages_run_under_one_mlflow_parent(repo):
    repo, env, out = repo
    assert ran_stages(out) == {*UPSTREAM, *DOWNSTREAM}
    metrics = json.loads((repo / "data/score/metrics.json").read_text())
    for set_name in ("test", "mini"):
        for model in ("bicubic", "dat", "dat+se", "swinir", "rfdn", "fusion"):
            assert set(metrics["sets"][set_name][model]) >= {"psnr_y", "ssim_y", "psnr_rgb"}
    assert metrics["cpu_isa"] == "avx2"
    assert (repo / "data/test/sr/mini/b0.png").is_file() and (repo / "data/test/weights/test/clock.png").is_file()
    # Wall-clock figures and the machine live in the run records, not in the (deterministic) metrics files.
    record = json.loads((repo / "data/runs/fusion.json").read_text())
    assert record["timing"]["train_seconds"] > 0 and record["machine"]["aten_capability"] == "AVX2"
    for path in (repo / "data").rglob("metrics.json"):
        assert "second" not in path.read_text(), path
    # One parent run for the whole `dvc repro`, although dvc.lock and the metrics files changed under it.
    [(name, status, stages)] = _parents(repo)
    assert name.startswith("repro-") and "+dirty" not in name and status == "FINISHED"
    assert stages == sorted([*UPSTREAM, *DOWNSTREAM])
    assert _status(repo, env) == UP_TO_DATE


_PREDICT = """
import sys
from pathlib import Path

import mlflow
import numpy as np

from srmodels.data.images import list_images, read_image

model = mlflow.pyfunc.load_model(sys.argv[1])
for lr_dir in sorted(Path("data/prepared/eval").glob("*/lr")):
    for lr in list_images(lr_dir):
        [sr] = model.predict(read_image(lr)[None])
        fused = read_image(Path("data/test/sr") / lr_dir.parent.name / f"{lr.stem}.png")
        print("same:", lr_dir.parent.name, lr.stem, sr.shape == fused.shape and bool(np.array_equal(sr, fused)))
"""


def test_the_registered_ensemble_gives_the_test_stage_pngs(repo):
    """The ensemble stage's registered MLflow model, loaded by name in a process on the pipeline's kernels,
    predicts every scored LR image as the test stage's PNG, bit for bit; `srmodels upscale` does the same."""
    from mlflow import MlflowClient

    from srmodels.core import isa

    repo, env, _ = repo
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [version] = client.search_model_versions("name = 'srmodels-ensemble'")
    fusion_psnr = json.loads((repo / "data/score/metrics.json").read_text())["sets"]["test"]["fusion"]["psnr_y"]
    assert float(version.tags["test.psnr_y"]) == fusion_psnr
    parent = client.get_run(version.run_id)
    assert parent.data.tags["srmodels.role"] == "pipeline"  # the pipeline's row shows the model
    pinned = {**env, **isa.environment("avx2")}
    out = _out([sys.executable, "-c", _PREDICT, f"models:/srmodels-ensemble/{version.version}"], repo, pinned)
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("same: ")]
    assert {(s, ok) for s, _, ok in rows} == {("test", "True"), ("mini", "True")}, out[-2000:]
    sr = repo / "sr-cli"
    _run_in([sys.executable, "-m", "srmodels", "upscale", "--cpu-isa", "avx2", "--weights", "data/ensemble",
             "data/prepared/eval/test/lr", "-o", str(sr)], repo, env)
    for png in sorted((repo / "data/test/sr/test").glob("*.png")):
        assert (sr / png.name).read_bytes() == png.read_bytes(), png.name
    shutil.rmtree(sr)


def test_tracking_settings_invalidate_nothing_and_inputs_invalidate_their_readers(repo):
    repo, env, _ = repo
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("experiment: srmodels", "experiment: elsewhere")
                      .replace("tracking_uri: sqlite:///mlflow.db", "tracking_uri: sqlite:///other.db"))
    assert _status(repo, {**env, "MLFLOW_TRACKING_URI": "sqlite:///third.db"}) == UP_TO_DATE
    params.write_text(original)

    def changed(path: Path, write) -> str:
        backup = path.read_bytes() if path.exists() else None
        write(path)
        try:
            return _status(repo, env)
        finally:
            path.unlink()
            if backup is not None:
                path.write_bytes(backup)

    status = changed(repo / "inputs/pretrained/rfdn/RFDN_x4.pth", lambda p: p.write_bytes(b"new weights"))
    assert status.startswith("finetune@rfdn:") and status.count("@") == 1 and "prepare" not in status
    status = changed(repo / "bench/HR/b1.png", lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\0" * 8))
    assert status.startswith("benchmark@mini:") and "finetune" not in status and "prepare" not in status
    status = changed(repo / "inputs/DIV2K/DIV2K_valid_HR.txt", lambda p: p.write_text("a new file"))
    assert status.startswith("prepare:") and "finetune" not in status
    assert _status(repo, env) == UP_TO_DATE


def test_a_failed_stage_is_one_line_and_keeps_its_previous_outputs(repo):
    repo, env, _ = repo
    before = _digests(repo)
    params = repo / "params.yaml"
    original = params.read_text()
    bad = yaml.safe_load(original)
    bad["fusion"]["lr_patch"] = 1000  # larger than every fusion image: found before training starts
    params.write_text(yaml.safe_dump(bad, sort_keys=False))
    res = _run_in([DVC, "repro", "fusion"], repo, env, ok=False)
    params.write_text(original)
    assert res.returncode != 0 and "Traceback" not in res.stderr + res.stdout
    [line] = [x for x in res.stderr.splitlines() if x.startswith("fusion: error:")]
    assert "training crop (lr_patch)" in line
    assert _digests(repo) == before and _status(repo, env) == UP_TO_DATE

    # A cut cache file: the stage names it and what rebuilds it.
    npy = repo / "data/cache/dat/val_se/coins.npy"
    whole = npy.read_bytes()
    npy.unlink()  # a new file: the output shares its file with DVC's cache (cache.type), which must stay whole
    npy.write_bytes(whole[: len(whole) // 2])
    try:
        res = _run_in([sys.executable, "-m", "stages.fusion"], repo, env, ok=False)
    finally:
        npy.unlink()
        npy.write_bytes(whole)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"fusion: error: {npy.relative_to(repo)}: truncated")
    assert "cache@dat" in res.stderr
    assert _digests(repo) == before


def test_experiments_rerun_only_the_fusion_and_the_workspace_comes_back_clean(repo):
    repo, env, _ = repo
    out = _out([DVC, "exp", "run", "-n", "ws", "-S", "fusion.epochs=2"], repo, env)
    assert ran_stages(out) == set(DOWNSTREAM), out[-3000:]
    out = _out([DVC, "exp", "run", "--temp", "-n", "tmp", "-S", "fusion.epochs=3"], repo, env)
    assert ran_stages(out) == set(DOWNSTREAM), out[-3000:]
    for name, setting in (("q1", "fusion.epochs=4"), ("q2", "fusion.lr=5.0e-4")):
        _run_in([DVC, "exp", "run", "--queue", "-n", name, "-S", setting], repo, env)
    _run_in([DVC, "queue", "start", "-j", "2"], repo, env)
    _wait_for_queue(repo, env, ["q1", "q2"], timeout=600)
    # What each experiment ran, from MLflow: every stage that runs is a child of the experiment's parent run.
    runs = {name: stages for name, _, stages in _parents(repo)}
    for name in ("ws", "tmp", "q1", "q2"):
        assert runs[name] == sorted(DOWNSTREAM), (name, runs)
    # The sweep summary reads the same finished runs from DVC and from MLflow, to the same numbers.
    summaries = {}
    for source in ("dvc", "mlflow"):
        out = repo / f"summary-{source}"
        _run_in([sys.executable, "-m", "srmodels", "summarize", "--from", source, "--exp", "q1", "--exp", "q2",
              "--resamples", "200", "-o", str(out)], repo, env)
        summaries[source] = json.loads((out / "summary.json").read_text())
        shutil.rmtree(out)
    models = {s: [c["models"] for c in summaries[s]["configurations"].values()] for s in summaries}
    assert models["dvc"] == models["mlflow"] and len(models["dvc"]) == 2
    _run_in(["git", "checkout", "--", "."], repo, env)
    _run_in([DVC, "checkout", "--force"], repo, env)
    assert _status(repo, env) == UP_TO_DATE
    assert not _run_in(["git", "status", "--porcelain", "--untracked-files=no"], repo, env).stdout.strip()


def _readme_experiments() -> list[list[str]]:
    """The `dvc exp run` lines of README's "Experiments" section, as argument lists."""
    section = (ROOT / "README.md").read_text().split("### Experiments", 1)[1].split("\n#", 1)[0]
    return [shlex.split(line.split("#", 1)[0]) for line in section.splitlines() if line.startswith("dvc exp run ")]


def command_changes_data(command: list[str]) -> bool:
    return any(arg.startswith("data.") for arg in command)


def _backbone_outputs(repo: Path, names: list[str]) -> list[Path]:
    """Every trained backbone's finetune and cache outputs (as DVC declares them) that exist."""
    files = []
    for b in names:
        files += [repo / "data/finetune" / b / f for f in ("best.pth", "curve.csv", "metrics.json")]
        files += sorted(p for p in (repo / "data/cache" / b).rglob("*") if p.is_file())
    return files


def test_every_documented_experiment_keeps_every_backbone_and_going_back_is_clean(repo):
    """Each README experiment in the workspace, then back to the baseline: no backbone's work is lost.

    Epoch counts are capped at 2 (the keys matter here, not the budget). Going back is `git checkout` of the
    experiment's edits and `dvc checkout`; it must leave nothing to re-run.
    """
    repo, env, _ = repo
    trained = yaml.safe_load((repo / "params.yaml").read_text())["trained"]
    before = _digests(repo)
    backbone_files = _backbone_outputs(repo, trained)
    assert len(backbone_files) > 9 * len(trained)
    experiments = _readme_experiments()
    assert len(experiments) >= 8 and any("fusion.members=" in " ".join(e) for e in experiments)
    try:
        for command in experiments:
            command = [re.sub(r"(epochs=)(\d+)", lambda m: m[1] + str(min(int(m[2]), 2)), arg) for arg in command]
            res = _run_in([DVC, *command[1:]], repo, env, ok=False)
            assert res.returncode == 0, f"{command}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            keys = [arg.lstrip("+").split("=")[0] for arg in command if "=" in arg]
            if all(k.startswith("fusion.") and k != "fusion.members" for k in keys):
                assert ran_stages(res.stdout + res.stderr) == set(DOWNSTREAM), (command, ran_stages(res.stdout + res.stderr))
            # Every backbone's outputs are there (an experiment on the data re-makes the caches' contents).
            missing = [str(f.relative_to(repo)) for f in backbone_files
                       if not f.is_file() and not ("data/cache" in str(f) and command_changes_data(command))]
            missing += [b for b in trained if not (repo / "data/cache" / b / "counts.json").is_file()]
            assert not missing, (command, missing)
            _run_in(["git", "checkout", "--", "."], repo, env)
            _run_in([DVC, "checkout", "--force"], repo, env)
            assert _status(repo, env) == UP_TO_DATE, command
            assert _digests(repo) == before, command
            assert all(f.is_file() for f in backbone_files), command
    finally:  # a failure here must not leave the next tests an experiment's params
        _run_in(["git", "checkout", "--", "."], repo, env, ok=False)
        _run_in([DVC, "checkout", "--force"], repo, env, ok=False)
    # An unknown member: one line naming the key and the name, and nothing deleted or changed.
    res = _run_in([DVC, "exp", "run", "-S", "fusion.members=[dat,nosuch]"], repo, env, ok=False)
    assert res.returncode != 0 and "Traceback" not in res.stdout + res.stderr
    # The first stale stage that reads the members says it (baselines, before the fusion).
    [line] = [x for x in res.stderr.splitlines() if "fusion.members" in x and "'nosuch'" in x]
    assert re.match(r"[a-z@]+: invalid params: fusion\.members\[1\]: 'nosuch' is not a backbone", line), line
    assert all(f.is_file() for f in backbone_files)
    _run_in(["git", "checkout", "--", "."], repo, env)
    assert _status(repo, env) == UP_TO_DATE and _digests(repo) == before


def test_a_code_change_that_changes_no_number_reruns_only_its_stage(repo):
    """The checkpoints hold nothing of the git state, so a re-run that gives the same numbers gives the same
    bytes, and DVC stops there: editing the finetune stage's script re-runs finetune and nothing after it."""
    repo, env, _ = repo
    before = _digests(repo)
    module = repo / "stages/finetune.py"
    original = module.read_text()
    module.write_text(original + "\n# a comment changes no number\n")
    _run_in(["git", "commit", "-qam", "a comment"], repo, env)
    out = _out([DVC, "repro"], repo, env)
    trained = yaml.safe_load((repo / "params.yaml").read_text())["trained"]
    assert ran_stages(out) == {f"finetune@{b}" for b in trained}, out[-3000:]
    assert _digests(repo) == before
    _run_in(["git", "commit", "-qam", "lock"], repo, env)
    assert _status(repo, env) == UP_TO_DATE


def test_forced_rerun_is_byte_identical_and_leaves_git_clean(repo):
    repo, env, _ = repo
    before = _digests(repo)
    # Tracking off: it changes no output (checked above), and skipping it saves seconds per stage.
    _run_in([DVC, "repro", "--force"], repo, {**env, "MLFLOW_TRACKING_URI": "none"})
    assert _digests(repo) == before
    # Every DVC output hashes as before, so dvc.lock is unchanged: what a fresh clone's `dvc repro` must give.
    assert not _run_in(["git", "status", "--porcelain"], repo, env).stdout.strip()
