"""Which stages an edit re-runs, as `dvc status` sees it in a real copy of this repository.

The copy holds the project's files and stand-in outputs that `dvc commit` records, so `dvc status` starts clean
and every stage it then reports comes from the edit alone.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from . import procs
from .helpers import BACKBONE_STAGES, DVC, copy_checkout, stale_stages

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def _run_checked(args: list[str], cwd: Path) -> str:
    """``args`` in ``cwd``, which must succeed; its stdout."""
    return procs.run(args, cwd=cwd, env=GIT_ENV, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def stand_in_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git and DVC copy of this checkout whose every output is a stand-in recorded by `dvc commit`: clean."""
    tmp_path = tmp_path_factory.mktemp("repo")
    copy_checkout(tmp_path)
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
    _run_checked(["git", "init", "-q"], tmp_path)
    _run_checked([DVC, "commit", "-f", "-q"], tmp_path)
    _run_checked(["git", "add", "-A"], tmp_path)
    _run_checked(["git", "commit", "-qm", "stand-in run"], tmp_path)
    assert stale_stages(tmp_path) == set()
    return tmp_path


@pytest.fixture
def clean_copy(stand_in_copy: Path) -> Path:
    """The copy, clean: each test's edits are undone before the next. `dvc status` was clean at the commit, and
    git says the tree is the commit again (the outputs, git-ignored, are never edited), so no stage is stale."""
    _run_checked(["git", "checkout", "-q", "--", "."], stand_in_copy)
    _run_checked(["git", "clean", "-qfd", "--", "srmodels"], stand_in_copy)
    assert _run_checked(["git", "status", "--porcelain", "--untracked-files=all"], stand_in_copy) == ""
    return stand_in_copy


def _append(path: Path, text: str = "\n# an edit\n") -> None:
    path.write_text(path.read_text() + text)


def test_the_stand_in_run_sees_a_real_change(clean_copy):
    """The check can fail: an edit to the training loop re-runs every backbone and the fusion."""
    _append(clean_copy / "srmodels/training/loop.py")
    trained = yaml.safe_load((clean_copy / "params.yaml").read_text())["trained"]
    assert {f"finetune@{b}" for b in trained} | {"fusion"} <= stale_stages(clean_copy)


def test_a_new_architecture_reruns_no_existing_backbone(clean_copy):
    (clean_copy / "srmodels/archs/toy.py").write_text("from torch import nn\n\n\nclass Toy(nn.Module):\n    pass\n\n"
                                                      "VARIANTS = {'toy': ({}, 1.0)}\n")
    init = clean_copy / "srmodels/archs/__init__.py"
    text = init.read_text()
    assert '    "rrdbnet": "RRDBNet",\n}' in text
    init.write_text(text.replace('    "rrdbnet": "RRDBNet",\n}', '    "rrdbnet": "RRDBNet",\n    "toy": "Toy",\n}'))
    stale = stale_stages(clean_copy)
    assert not {s for s in stale if s.startswith(BACKBONE_STAGES)}, stale
    # The two stages that read every member's architecture: baselines (their costs) and ensemble (which
    # rebuilds each member to check its file loads); both are cheap.
    assert stale <= {"baselines", "ensemble"}


REPORTING_AND_INTEROP = ["srmodels/interop/export.py", "srmodels/evaluation/report.py",
                         "srmodels/evaluation/summarize.py", "srmodels/cli.py", "srmodels/tracking/__init__.py"]


def test_reporting_and_interop_code_reruns_no_training_and_no_caching(clean_copy):
    """All of them edited at once, one `dvc status`: a stage is stale when any of its dependencies changed, so a
    stage the joint edit leaves up to date, each edit alone leaves up to date too."""
    for module in REPORTING_AND_INTEROP:
        _append(clean_copy / module)
    stale = stale_stages(clean_copy)
    assert stale, "the edits changed no stage's dependencies: the check would pass whatever dvc.yaml says"
    assert not {s for s in stale if s.startswith(BACKBONE_STAGES) or s in ("fusion", "prepare")}, stale


def test_prepare_does_not_depend_on_checkpoint_code(clean_copy):
    _append(clean_copy / "srmodels/models/checkpoint.py")
    stale = stale_stages(clean_copy)
    assert "prepare" not in stale and "finetune@dat" in stale
