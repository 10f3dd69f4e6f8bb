"""docs/extending.md's three recipes, each followed on a toy with the code blocks the page shows.

- (a) a new backbone as a fusion member: in a throwaway copy of the repository on a minimal profile, the toy
  architecture, its ``ARCHS`` entry, inputs folder and params entries, then ``dvc repro``; a second toy
  architecture afterwards leaves every existing backbone's stages up to date;
- (b) a new loss term with a params knob: the schema refuses the knob until it lists it, and the recipe's loss
  closure is the fusion job's loss at weight 0 and adds the term above it;
- (c) a new stage after ``score``, in the copy (a) ran: DVC places it after ``score`` and runs it alone, and
  tests/test_dvc_deps.py's check accepts its deps.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from srmodels.core import params as params_module
from srmodels.core.params import ParamsError, merged, read_yaml, validate
from srmodels.data.datasets import FusionCrops, fusion_images
from srmodels.data.images import write_image
from srmodels.models.fusion import AttentionWeightNet
from srmodels.training import fusion as fusion_training

from . import procs
from . import test_dvc_deps as dvc_deps  # its import walk and coverage check (a module object: not re-collected)
from .helpers import (BACKBONE_STAGES, DVC, ROOT, SCALE, copy_checkout, downscale, minimal_params, ran_stages, smooth_image,
                     stale_stages)

DOC = ROOT / "docs" / "extending.md"
TOY = "toynet"


def snippet(label: str) -> str:
    """The code block of docs/extending.md whose first line is ``# <label>``, without that line."""
    blocks = [textwrap.dedent(b) for b in re.findall(r"^ *```(?:python|yaml)\n(.*?)^ *```", DOC.read_text(),
                                                     flags=re.S | re.M)]
    found = [b.split("\n", 1)[1] for b in blocks if b.split("\n", 1)[0] == f"# {label}"]
    assert len(found) == 1, f"docs/extending.md: expected one code block starting '# {label}', found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------- the copy and its pipeline run


def _git_env(repo: Path) -> dict[str, str]:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "MLFLOW_TRACKING_URI": "none"}  # tracking changes no result
    for key in ("DVC_EXP_NAME", "SRMODELS_PARAMS", "SRMODELS_DEBUG"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], repo: Path, env: dict[str, str], timeout: float = 120):
    return procs.run(cmd, cwd=repo, env=env, timeout=timeout, check=True)


def add_architecture(repo: Path, name: str, module_text: str, archs_line: str) -> None:
    """Recipe (a), steps 1-3: the architecture's file, its ARCHS line and its inputs folder."""
    (repo / "srmodels/archs" / f"{name}.py").write_text(module_text)
    init = repo / "srmodels/archs/__init__.py"
    lines = init.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if re.match(r"ARCHS\b[^=]*= \{$", line))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    init.write_text("\n".join([*lines[:end], archs_line, *lines[end:]]))
    folder = repo / "inputs/pretrained" / name
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"Released {name} weights go here (backbones.{name}.pretrained).\n")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A copy of the working tree (no pipeline outputs) on the minimal profile, committed; recipe (a) applied
    with the toy architecture; `dvc repro`; the results committed. Returns (repo, env, repro output)."""
    repo = tmp_path_factory.mktemp("extending")
    env = _git_env(repo)
    copy_checkout(repo, outputs=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(minimal_params(), sort_keys=False))
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "minimal profile"], repo, env)

    add_architecture(repo, TOY, snippet(f"srmodels/archs/{TOY}.py"),
                     snippet("srmodels/archs/__init__.py: a line in ARCHS").rstrip("\n"))
    params = merged(yaml.safe_load((repo / "params.yaml").read_text()), yaml.safe_load(snippet("params.yaml")))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([sys.executable, "-m", "srmodels", "check"], repo, env)
    res = _run([DVC, "repro"], repo, env, timeout=900)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", f"{TOY} as a member"], repo, env)
    return repo, env, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------- (a) backbone


@pytest.mark.slow
def test_new_backbone_joins_the_fusion_and_reruns_no_other_backbone(pipeline):
    repo, env, out = pipeline
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert TOY in params["trained"] and TOY in params["fusion"]["members"]
    ran = ran_stages(out)
    assert {f"finetune@{TOY}", f"cache@{TOY}", "fusion", "score", "ensemble"} <= ran, out[-3000:]
    assert json.loads((repo / f"data/finetune/{TOY}/metrics.json").read_text())["variant"] == f"{TOY}_small"
    fusion = json.loads((repo / "data/fusion/metrics.json").read_text())
    assert set(fusion["member_val_psnr"]) == set(params["fusion"]["members"])
    score = json.loads((repo / "data/score/metrics.json").read_text())
    assert {TOY, f"{TOY}+se"} <= set(score["sets"]["test"])
    assert re.search(rf"^\| {TOY}\+se \|", (repo / "data/score/table.md").read_text(), flags=re.M)
    assert stale_stages(repo, env) == set()

    # A second architecture, the recipe's way: no stage of an existing backbone is stale.
    second = snippet(f"srmodels/archs/{TOY}.py").replace("ToyNet", "ToyNet2").replace(f'"{TOY}', f'"{TOY}2')
    add_architecture(repo, f"{TOY}2", second, f'    "{TOY}2": "ToyNet2",')
    try:
        stale = stale_stages(repo, env)
        assert not {s for s in stale if s.startswith(BACKBONE_STAGES)}, stale
        # The stages that read every architecture: baselines (the members' costs), ensemble (rebuilds them).
        assert stale <= {"baselines", "ensemble"}, stale
    finally:
        _run(["git", "checkout", "-q", "--", "."], repo, env)
        _run(["git", "clean", "-qfd", "--", "srmodels", "inputs"], repo, env)
    assert stale_stages(repo, env) == set()


# ------------------------------------------------------------------------------------------ (b) loss term


def _fusion_data(root: Path) -> tuple[FusionCrops, list]:
    """Two members' cached outputs of a few smooth images, each member off by its own offset."""
    gen = np.random.default_rng(5)
    for split, stems in (("fusion_train", ["f0", "f1"]), ("val", ["v0"])):
        for stem in stems:
            hr = smooth_image(gen, 48, 48)
            write_image(root / split / "hr" / f"{stem}.png", hr)
            write_image(root / split / "lr" / f"{stem}.png", downscale(hr))
            exact = hr.transpose(2, 0, 1).astype(np.float32) / 255.0
            for member, offset in (("a", 0.05), ("b", -0.08)):
                (root / "cache" / member / split).mkdir(parents=True, exist_ok=True)
                np.save(root / "cache" / member / split / f"{stem}.npy", (exact + offset).astype(np.float16))
    train = FusionCrops([root / "cache" / m / "fusion_train" for m in "ab"], root / "fusion_train" / "hr",
                        root / "fusion_train" / "lr", lr_patch=8, scale=SCALE, crops_per_image=2, seed=0)
    val = fusion_images([root / "cache" / m / "val" for m in "ab"], root / "val" / "hr", root / "val" / "lr", SCALE)
    return train, val


def _recipe_loss(kind: str, l1_weight: float, mse_weight: float, edge_weight: float):
    """The recipe's term and loss closure, run in srmodels/training/fusion.py's namespace with the knobs bound."""
    namespace = {**vars(fusion_training), "F": F, "kind": kind, "l1_weight": l1_weight, "mse_weight": mse_weight,
                 "edge_weight": edge_weight}
    exec(snippet("srmodels/training/fusion.py: the term"), namespace)
    exec(snippet("srmodels/training/fusion.py: the loss closure in fusion_job"), namespace)
    return namespace["loss"], namespace["edge_l1"]


def test_a_fusion_loss_term_composes_the_recipe_way(tmp_path, monkeypatch):
    # Step 3 is needed: the committed schema refuses the knob in one line naming it, and accepts it once listed.
    raw = read_yaml(ROOT / "params.yaml")
    raw["fusion"]["edge_weight"] = 0.1
    with pytest.raises(ParamsError) as refused:
        validate(raw)
    message = str(refused.value)
    assert message.startswith("fusion.edge_weight: unknown key") and "\n" not in message, message
    monkeypatch.setitem(params_module.SCHEMA["fusion"], "edge_weight", float)
    assert validate(raw)["fusion"]["edge_weight"] == 0.1

    # Steps 1-2: the recipe's closure is the fusion job's loss at weight 0, and adds the weighted term above it.
    train, val = _fusion_data(tmp_path)
    torch.manual_seed(0)
    net = AttentionWeightNet(num_members=2)
    job = fusion_training.fusion_job(net, "pixel", train, val, l1_weight=0.8, mse_weight=0.2)
    assert job.identity["l1_weight"] == 0.8 and job.identity["mse_weight"] == 0.2  # where the knob is recorded
    batch = list(torch.utils.data.default_collate([train[i] for i in range(len(train))]))
    today = job.loss(net, batch)
    off, _ = _recipe_loss("pixel", 0.8, 0.2, edge_weight=0.0)
    assert torch.equal(off(net, batch), today)
    on, edge_l1 = _recipe_loss("pixel", 0.8, 0.2, edge_weight=0.5)
    with_term = on(net, batch)
    cands, lr, hr = batch
    term = edge_l1(fusion_training.fused(net, "pixel", cands, lr), hr)
    assert term > 0 and torch.allclose(with_term, today + 0.5 * term, rtol=0, atol=1e-7)
    with_term.backward()  # the term reaches the weight net
    assert all(p.grad is not None for p in net.parameters())

    # Step 4: dvc.yaml and the checkpoint's provenance already cover any fusion.* key.
    fusion_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["fusion"]
    assert "fusion" in fusion_stage["params"]
    tree = ast.parse((ROOT / "stages/fusion.py").read_text())
    made_of = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "MADE_OF" for t in node.targets))
    assert "fusion" in made_of


# -------------------------------------------------------------------------------------- (c) stage after score


@pytest.mark.slow
def test_a_stage_after_score_runs_alone_and_its_deps_cover_its_imports(pipeline, monkeypatch):
    repo, env, _ = pipeline
    assert stale_stages(repo, env) == set()
    (repo / "stages/digest.py").write_text(snippet("stages/digest.py"))
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"].update(yaml.safe_load(snippet("dvc.yaml: under stages")))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    dag = _run([DVC, "dag", "--dot"], repo, env).stdout
    assert re.search(r'"score"\s*->\s*"digest"', dag), dag
    assert stale_stages(repo, env) == {"digest"}
    res = _run([DVC, "repro"], repo, env, timeout=300)
    assert ran_stages(res.stdout + res.stderr) == {"digest"}, res.stdout[-3000:]
    [line] = (repo / "data/digest/summary.txt").read_text().splitlines()
    assert line.startswith("test: fusion ") and " dB" in line, line
    assert stale_stages(repo, env) == set()

    # tests/test_dvc_deps.py's check, on the copy: it accepts the entry, and would refuse it without srmodels/core.
    monkeypatch.setattr(dvc_deps, "ROOT", repo)
    stages = {name: (script, deps) for name, script, deps in dvc_deps.stages()}
    script, deps = stages["digest"]
    assert "srmodels/core/files.py" in dvc_deps.srmodels_imports(repo / script)
    dvc_deps.test_stage_deps_cover_imports("digest", script, deps)
    with pytest.raises(AssertionError, match="srmodels/core/"):
        dvc_deps.test_stage_deps_cover_imports("digest", script, [d for d in deps if d != "srmodels/core"])
