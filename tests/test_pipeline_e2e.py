"""The whole DVC pipeline end to end on a minimal profile, in a throwaway git repo.

Checks: every stage runs; outputs and metrics land where dvc.yaml says; `dvc exp run -S fusion.epochs=...`
re-runs only fusion/test/score; a forced clean re-run gives identical metrics and PNGs (determinism).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")

pytestmark = pytest.mark.slow


def _minimal_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"]["samples"] = {"backbone_train": ["camera", "brick"], "fusion_train": ["grass", "gravel"],
                            "val": ["coins"], "test": ["clock"]}
    p["data"]["patches"] = {"hr_size": 96, "step": 96}
    for bb in p["backbones"].values():
        bb.update(epochs=1, batch=4, lr_patch=16)
    p["backbones"]["dat"]["variant"] = "dat_small"
    p["fusion"].update(epochs=1, batch=4, lr_patch=16, crops_per_image=2)
    return p


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _digests(repo: Path) -> dict[str, str]:
    # data/fusion/metrics.json is left out: it records wall-clock speeds (train_seconds, samples/s).
    files = [repo / "data/score/metrics.json",
             *sorted((repo / "data/test").rglob("*.png")), *sorted((repo / "data/score/plots").glob("*.png"))]
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pipeline")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if rel.startswith("data/") and not rel.endswith(".gitignore"):
            continue  # start without any committed outputs or lock
        if rel == "dvc.lock":
            continue
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    (repo / "params.yaml").write_text(yaml.safe_dump(_minimal_params(), sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_EXP_NAME", None)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "minimal profile"], repo, env)
    out = _run([DVC, "repro"], repo, env)
    return repo, env, out


def test_all_stages_run_and_write_outputs(repo):
    repo, _, out = repo
    for stage in ("prepare", "finetune@dat", "finetune@swinir", "finetune@rfdn", "cache@dat", "cache@swinir",
                  "cache@rfdn", "fusion", "test", "score"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "data/score/metrics.json").read_text())
    test = metrics["sets"]["test"]
    for model in ("bicubic", "dat", "dat+se", "swinir", "rfdn", "fusion"):
        assert set(test[model]) >= {"psnr_y", "ssim_y", "psnr_rgb"}
    assert (repo / "data/test/sr/test/clock.png").is_file()
    assert (repo / "data/test/weights/test/clock.png").is_file()
    assert (repo / "data/score/table.md").read_text().count("|") > 10
    for name in ("psnr_bar.png", "curves.png"):
        assert (repo / "data/score/plots" / name).is_file()
    assert (repo / "data/finetune/dat/best.pth").is_file() and (repo / "data/cache/rfdn/val_se/coins.npy").is_file()
    assert (repo / "mlflow.db").is_file()


def _fusion_scores(repo: Path) -> dict:
    m = json.loads((repo / "data/fusion/metrics.json").read_text())
    return {k: v for k, v in m.items() if "psnr" in k}


def test_fusion_param_change_skips_backbones_and_rerun_is_deterministic(repo):
    repo, env, _ = repo
    before, fusion_before = _digests(repo), _fusion_scores(repo)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "lock"], repo, env)
    out = _run([DVC, "exp", "run", "-S", "fusion.epochs=2"], repo, env)
    for stage in ("prepare", "finetune@dat", "finetune@rfdn", "cache@dat", "cache@swinir"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    assert "Running stage 'fusion'" in out and "Running stage 'score'" in out
    # back to the committed params, then a forced clean re-run of everything: identical bytes
    _run(["git", "checkout", "--", "params.yaml"], repo, env)
    for resume in (repo / "data/finetune").glob("*/resume.pth"):
        resume.unlink()  # a clean run: no resuming of finished training
    _run([DVC, "repro", "--force", "--no-run-cache"], repo, env)
    assert _digests(repo) == before
    assert _fusion_scores(repo) == fusion_before
