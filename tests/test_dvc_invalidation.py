"""Which stages an edit re-runs, as `dvc status` sees it in a real copy of this repository.

The copy holds the project's files and stand-in outputs that `dvc commit` records, so `dvc status` starts clean
and every stage it then reports comes from the edit alone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
BACKBONE_STAGES = ("finetune@", "cache@")


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def _copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("repo")
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp_path / rel)
    # Stand-ins for every output (the committed dvc.lock says which are folders); `dvc commit` records them
    # with the dependencies as they are, which makes `dvc status` clean.
    for stage in yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            path = tmp_path / out["path"]
            if path.exists():
                continue
            if out["md5"].endswith(".dir"):
                path.mkdir(parents=True)
                (path / "stand-in").write_text(out["path"])
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(out["path"])
    _run(["git", "init", "-q"], tmp_path)
    _run([DVC, "commit", "-f", "-q"], tmp_path)
    _run(["git", "add", "-A"], tmp_path)
    _run(["git", "commit", "-qm", "stand-in run"], tmp_path)
    return tmp_path


@pytest.fixture
def repo(_copy: Path) -> Path:
    """The copy, clean: each test's edits are undone before the next."""
    _run(["git", "checkout", "-q", "--", "."], _copy)
    _run(["git", "clean", "-qfd", "--", "srmodels"], _copy)
    assert _stale(_copy) == set()
    return _copy


def _stale(repo: Path) -> set[str]:
    """The stages `dvc status` says would run."""
    return set(json.loads(_run([DVC, "status", "--json"], repo) or "{}"))


def _append(path: Path, text: str = "\n# an edit\n") -> None:
    path.write_text(path.read_text() + text)


def test_the_stand_in_run_sees_a_real_change(repo):
    """The check can fail: an edit to the training loop re-runs every backbone and the fusion."""
    _append(repo / "srmodels/training/loop.py")
    trained = yaml.safe_load((repo / "params.yaml").read_text())["trained"]
    assert {f"finetune@{b}" for b in trained} | {"fusion"} <= _stale(repo)


def test_a_new_architecture_reruns_no_existing_backbone(repo):
    (repo / "srmodels/archs/toy.py").write_text("from torch import nn\n\n\nclass Toy(nn.Module):\n    pass\n\n"
                                                "VARIANTS = {'toy': ({}, 1.0)}\n")
    init = repo / "srmodels/archs/__init__.py"
    text = init.read_text()
    assert '    "rrdbnet": "RRDBNet",\n}' in text
    init.write_text(text.replace('    "rrdbnet": "RRDBNet",\n}', '    "rrdbnet": "RRDBNet",\n    "toy": "Toy",\n}'))
    stale = _stale(repo)
    assert not {s for s in stale if s.startswith(BACKBONE_STAGES)}, stale
    assert stale <= {"baselines"}  # the one stage that reads every member's architecture (their costs)


@pytest.mark.parametrize("module", ["srmodels/interop/export.py", "srmodels/evaluation/report.py",
                                    "srmodels/evaluation/summarize.py", "srmodels/cli.py", "srmodels/tracking.py"])
def test_reporting_and_interop_code_reruns_no_training_and_no_caching(repo, module):
    _append(repo / module)
    stale = _stale(repo)
    assert not {s for s in stale if s.startswith(BACKBONE_STAGES) or s in ("fusion", "prepare")}, stale


def test_prepare_does_not_depend_on_checkpoint_code(repo):
    _append(repo / "srmodels/models/checkpoint.py")
    stale = _stale(repo)
    assert "prepare" not in stale and "finetune@dat" in stale
