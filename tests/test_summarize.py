"""Seed-sweep summaries: the crossed bootstrap, grouping by configuration, the fusion's gain, the files written,
and reading finished runs back from real DVC experiments and a real MLflow store (tiny, built here)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from srmodels.evaluation import summarize as S
from srmodels.core.errors import UserError
from srmodels.core.params import flatten_text
from srmodels.metrics.statistics import crossed_bootstrap, paired_bootstrap

from . import procs

IMAGES = ("a", "b", "c", "d")
MODELS = ("bicubic", "dat", "dat+se", "rfdn", "rfdn+se", "fusion")


def _table(scores: dict[str, list[float]], set_name: str = "test") -> list[dict[str, str]]:
    return [{"set": set_name, "image": img, "model": m, "psnr_y": repr(float(v[k])), "ssim_y": "0.8"}
            for k, img in enumerate(IMAGES) for m, v in scores.items()]


def _fake_run(name: str, seed: int, *, offset: float = 0.0, gain: float = 0.0, init: str = "best_member",
              val: dict[str, float] | None = None, fusion_val: float = 30.0) -> S.PipelineRun:
    base = np.array([30.0, 28.0, 35.0, 25.0]) + 0.01 * seed
    scores = {"bicubic": base - 1, "dat": base + offset, "dat+se": base + offset + 0.1, "rfdn": base - 0.5,
              "rfdn+se": base - 0.4}
    scores["fusion"] = scores["dat+se"] + gain + np.array([0.0, 0.002, -0.002, 0.0]) * seed
    params = flatten_text({"seed": seed, "fusion": {"init": init, "members": ["dat", "rfdn"]},
                           "mlflow": {"experiment": f"x{seed}"}})
    return S.PipelineRun(name=name, params=params, per_image=_table({m: list(v) for m, v in scores.items()}),
                         member_val_psnr=val or {"dat": 30.0, "rfdn": 29.0}, fusion_val_psnr=fusion_val)


# ---------------------------------------------------------------------------------------------------------------
# The crossed bootstrap
# ---------------------------------------------------------------------------------------------------------------
def test_crossed_bootstrap_is_seeded_and_exact_on_a_constant_table():
    d = np.full((3, 4), 0.25)
    out = crossed_bootstrap(d, resamples=500, seed=1)
    assert (out["mean_diff"], out["ci_low"], out["ci_high"]) == (0.25, 0.25, 0.25)
    assert out["verdict"] == "better" and out["seed_wins"] == 3 and out["num_images"] == 4
    rng = np.random.default_rng(0)
    d = rng.normal(size=(5, 7))
    assert crossed_bootstrap(d, resamples=2000, seed=3) == crossed_bootstrap(d, resamples=2000, seed=3)
    assert crossed_bootstrap(d, resamples=2000, seed=3) != crossed_bootstrap(d, resamples=2000, seed=4)


def test_crossed_bootstrap_counts_the_seeds_spread_that_an_images_only_bootstrap_hides():
    # Seeds disagree (one helps by 0.1 dB, one hurts by 0.1 dB) while images within a seed agree exactly.
    d = np.array([[0.1] * 20, [-0.1] * 20, [0.1] * 20, [-0.1] * 20, [0.12] * 20])
    crossed = crossed_bootstrap(d, resamples=4000, seed=0)
    images_only = paired_bootstrap(d.mean(axis=0), np.zeros(20), resamples=4000, seed=0)
    assert images_only["ci_high"] - images_only["ci_low"] < 1e-9  # it sees no uncertainty at all
    assert crossed["ci_low"] < 0 < crossed["ci_high"] and crossed["verdict"] == "no significant difference"
    assert (crossed["seed_wins"], crossed["seed_losses"]) == (3, 2)
    # And the reverse: images disagree, seeds do not: the image level still widens the interval.
    d = np.tile(np.array([0.3, -0.2, 0.25, -0.25, 0.1]), (5, 1))
    assert crossed_bootstrap(d, resamples=4000, seed=0)["ci_high"] - crossed_bootstrap(
        d, resamples=4000, seed=0)["ci_low"] > 0.1


def test_crossed_bootstrap_warns_with_few_seeds_or_images_and_refuses_a_bad_table():
    assert "only 3 seeds and 4 images" in crossed_bootstrap(np.ones((3, 4)), resamples=10, seed=0)["warning"]
    assert "warning" not in crossed_bootstrap(np.ones((5, 10)), resamples=10, seed=0)
    with pytest.raises(ValueError, match=r"a seeds x images table needed, got shape \(4,\)"):
        crossed_bootstrap(np.ones(4), resamples=10, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Grouping and the summary
# ---------------------------------------------------------------------------------------------------------------
def test_runs_group_by_params_other_than_seed_and_are_named_by_what_differs():
    runs = ([_fake_run(f"b{s}", s) for s in range(3)]
            + [_fake_run(f"r{s}", s, init="random", gain=0.05) for s in range(2)])
    groups = S.configurations(runs)
    assert list(groups) == ["fusion.init=best_member", "fusion.init=random"]
    assert [r.name for r in groups["fusion.init=random"]] == ["r0", "r1"]
    assert list(S.configurations(runs[:3])) == ["all runs"]  # mlflow settings differ: not a configuration


def test_a_repeated_seed_counts_once_and_a_conflicting_one_is_refused():
    configurations = S.configurations([_fake_run("a", 0), _fake_run("a-again", 0), _fake_run("b", 1)])
    assert [r.name for r in configurations["all runs"]] == ["a", "b"]
    with pytest.raises(UserError, match="share seed 0"):
        S.configurations([_fake_run("a", 0), _fake_run("other", 0, offset=0.5)])
    with pytest.raises(UserError, match="no finished pipeline runs"):
        S.configurations([])


def test_summary_statistics_over_seeds_and_the_gain_over_the_validation_best_member():
    runs = [_fake_run(f"s{s}", s, gain=0.02 * (s + 1), fusion_val=30.0 + 0.001 * s) for s in range(5)]
    out = S.summarize(runs, resamples=2000, seed=0)
    conf = out["configurations"]["all runs"]
    assert conf["seeds"] == [0, 1, 2, 3, 4] and conf["images"] == list(IMAGES)
    dat = conf["models"]["dat"]["psnr_y"]
    seed_means = [29.5 + 0.01 * s for s in range(5)]
    assert dat["per_seed"] == pytest.approx(seed_means, abs=1e-4)
    assert dat["mean"] == pytest.approx(np.mean(seed_means), abs=1e-4)
    assert dat["sd"] == pytest.approx(np.std(seed_means, ddof=1), abs=1e-4)
    gain = conf["gain_over_best_member"]
    assert gain["reference_per_seed"] == ["dat+se"] * 5  # DAT is best on validation, so its x8 output
    assert gain["per_seed"] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.10], abs=1e-4)
    assert gain["test"]["mean_diff"] == pytest.approx(0.06, abs=1e-4)
    assert gain["test"]["verdict"] == "better" and gain["test"]["ci_low"] > 0
    assert gain["val"]["per_seed"] == pytest.approx([0.001 * s for s in range(5)], abs=1e-4)


def test_the_reference_member_is_chosen_on_validation_not_on_the_scored_set():
    # RFDN is best on validation in this run although DAT is far better on test: the gain is against RFDN+x8.
    run = _fake_run("s0", 0, val={"dat": 29.0, "rfdn": 30.0})
    gain = S.summarize([run], resamples=100, seed=0)["configurations"]["all runs"]["gain_over_best_member"]
    assert gain["reference_per_seed"] == ["rfdn+se"]
    assert gain["test"]["mean_diff"] == pytest.approx(0.1 + 0.4, abs=1e-4)  # fusion = dat+se = rfdn+se + 0.5


def test_configurations_are_compared_on_the_seeds_both_ran():
    runs = ([_fake_run(f"b{s}", s) for s in range(4)]
            + [_fake_run(f"r{s}", s, init="random", gain=-0.3) for s in (1, 2, 3, 9)])
    between = S.summarize(runs, resamples=1000, seed=0)["between_configurations"]
    (name, c), = between.items()
    assert name == "fusion (fusion.init=best_member) vs fusion (fusion.init=random)"
    assert c["num_seeds"] == 3 and c["mean_diff"] == pytest.approx(0.3, abs=1e-4) and c["verdict"] == "better"


def test_runs_scored_on_other_images_or_without_the_set_are_refused():
    odd = _fake_run("odd", 1)
    odd = S.PipelineRun(name="odd", params=odd.params, per_image=[r for r in odd.per_image if r["image"] != "d"],
                        member_val_psnr=odd.member_val_psnr, fusion_val_psnr=30.0)
    with pytest.raises(UserError, match="other images"):
        S.summarize([_fake_run("s0", 0), odd], resamples=10, seed=0)
    with pytest.raises(UserError, match="scored no set 'Set5'.*test"):
        S.summarize([_fake_run("s0", 0)], set_name="Set5", resamples=10, seed=0)


def test_written_files_are_deterministic_and_the_markdown_states_the_interval(tmp_path):
    runs = ([_fake_run(f"b{s}", s) for s in range(3)]
            + [_fake_run(f"r{s}", s, init="random", gain=0.01) for s in range(3)])
    summary = S.summarize(runs, resamples=500, seed=0)
    first = [p.read_bytes() for p in S.write_summary(tmp_path / "one", summary)]
    second = [p.read_bytes() for p in S.write_summary(tmp_path / "two", S.summarize(runs, resamples=500, seed=0))]
    assert first == second
    assert first[2][:8] == b"\x89PNG\r\n\x1a\n"
    text = first[0].decode()
    assert "### fusion.init=random" in text and "95% CI, seeds and images resampled" in text
    assert "| dat+se | " in text and "only 3 seeds and 4 images" in text
    assert json.loads(first[1])["configurations"]["fusion.init=random"]["seeds"] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Reading finished runs: DVC experiments and MLflow
# ---------------------------------------------------------------------------------------------------------------
FAKE_PIPELINE = '''
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
seed, init = p["seed"], p["fusion"]["init"]
os.makedirs("out/score", exist_ok=True); os.makedirs("out/fusion", exist_ok=True)
rows = ["set,image,model,psnr_y,ssim_y"]
for k, img in enumerate(["a", "b", "c"]):
    dat = 30 + k + 0.01 * seed
    fusion = dat + (0.02 if init == "random" else 0.0)
    rows += [f"test,{img},dat+se,{dat},0.9", f"test,{img},rfdn+se,{dat - 1},0.8", f"test,{img},fusion,{fusion},0.9"]
open("out/score/per_image.csv", "w").write("\\n".join(rows) + "\\n")
json.dump({"member_val_psnr": {"dat": 31.0 + seed, "rfdn": 30.0}, "best_val_psnr": 31.0 + seed},
          open("out/fusion/metrics.json", "w"))
'''


def _git(cwd: Path, *args: str) -> None:
    procs.run(["git", *args], cwd=cwd, check=True, timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_dvc_experiments_are_read_back_and_summarised_by_the_command(tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "fake.py").write_text(FAKE_PIPELINE)
    (repo / "params.yaml").write_text("seed: 0\nfusion:\n  init: best_member\npaths:\n  score: out/score\n"
                                      "  fusion: out/fusion\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  all:\n    cmd: python fake.py\n    deps: [fake.py]\n    params: [seed, fusion.init]\n"
        "    outs: [out/score/per_image.csv]\n    metrics: [{out/fusion/metrics.json: {cache: false}}]\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        procs.run(cmd, cwd=repo, check=True, env=env, timeout=120)
    for seed in (0, 1, 2):
        for init in ("best_member", "random"):
            procs.run([*dvc, "exp", "run", "-q", "-n", f"s{seed}-{init}", "-S", f"seed={seed}", "-S",
                       f"fusion.init={init}"], cwd=repo, check=True, env=env, timeout=300)
    runs = S.dvc_runs(repo)
    assert sorted(r.name for r in runs) == sorted(f"s{s}-{i}" for s in range(3) for i in ("best_member", "random"))
    assert {r.seed for r in runs} == {0, 1, 2} and runs[0].member_val_psnr == {"dat": 31.0, "rfdn": 30.0}
    with pytest.raises(UserError, match="no experiment named nope"):
        S.dvc_runs(repo, ["nope"])

    from srmodels.cli import main
    out = tmp_path / "summary"
    assert main(["summarize", "--repo", str(repo), "-o", str(out), "--resamples", "500"]) == 0
    text = capsys.readouterr().out
    assert "### fusion.init=best_member" in text and "### fusion.init=random" in text
    summary = json.loads((out / "summary.json").read_text())
    random = summary["configurations"]["fusion.init=random"]
    assert random["gain_over_best_member"]["test"]["mean_diff"] == pytest.approx(0.02, abs=1e-4)
    assert random["models"]["dat+se"]["psnr_y"]["per_seed"] == pytest.approx([31.0, 31.01, 31.02], abs=1e-4)
    (name, c), = summary["between_configurations"].items()
    assert c["mean_diff"] == pytest.approx(-0.02, abs=1e-4) and c["num_seeds"] == 3
    # Only some experiments: one configuration.
    assert main(["summarize", "--repo", str(repo), "-o", str(out), "--exp", "s0-random", "--exp", "s1-random"]) == 0
    assert list(json.loads((out / "summary.json").read_text())["configurations"]) == ["all runs"]


def test_mlflow_pipeline_runs_are_read_back(tmp_path, empty_mlflow_db):
    from mlflow.tracking import MlflowClient

    from srmodels import tracking

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    for run in (_fake_run("b0", 0), _fake_run("b1", 1), _fake_run("r0", 0, init="random", gain=0.01)):
        parent = client.create_run(exp_id, run_name=run.name, tags={tracking.TAG_ROLE: "pipeline"}).info.run_id
        for key, value in run.params.items():
            client.log_param(parent, key, value)
        for stage in ("fusion", "score"):
            child = client.create_run(exp_id, run_name=stage, tags={"srmodels.stage": stage,
                                                                   "mlflow.parentRunId": parent}).info.run_id
            folder = tmp_path / run.name / stage
            folder.mkdir(parents=True)
            if stage == "score":
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=list(run.per_image[0]))
                writer.writeheader()
                writer.writerows(run.per_image)
                (folder / "per_image.csv").write_text(buf.getvalue())
            else:
                (folder / "metrics.json").write_text(json.dumps({"member_val_psnr": dict(run.member_val_psnr),
                                                                 "best_val_psnr": run.fusion_val_psnr}))
            client.log_artifacts(child, str(folder))
            client.set_terminated(child)
    # A pipeline whose score stage never finished does not count.
    client.create_run(exp_id, run_name="half", tags={tracking.TAG_ROLE: "pipeline"})
    params = {"mlflow": {"tracking_uri": uri, "experiment": "sweep"}}
    runs = S.mlflow_runs(tracking.finished_pipelines(params))
    assert [r.name for r in runs] == ["b0", "r0", "b1"]
    assert runs[0].member_val_psnr == {"dat": 30.0, "rfdn": 29.0}
    summary = S.summarize(runs, resamples=200, seed=0)
    assert list(summary["configurations"]) == ["fusion.init=best_member", "fusion.init=random"]
    with pytest.raises(UserError, match="no finished pipeline run named half"):
        tracking.finished_pipelines(params, names=["half"])


def test_baselines_heads_and_oracles_against_the_best_member_in_one_table():
    def run(name: str, seed: int, head: str, fusion_gain: float) -> S.PipelineRun:
        r = _fake_run(name, seed, gain=fusion_gain)
        base = np.array([30.0, 28.0, 35.0, 25.0]) + 0.01 * seed + 0.1  # dat+se
        extra = {"mean": base - 0.2, "oracle:convex": base + 0.4, "oracle:pixel": base + 0.3}
        params = {**r.params, "fusion.head": head}
        costs = {"dat+se": {"params": 10, "macs_per_pixel": 824.0}, "fusion": {"params": 18, "macs_per_pixel": 9.0},
                 "mean": {"params": 15, "macs_per_pixel": 8.0}, "oracle:convex": {"params": None,
                                                                              "macs_per_pixel": None}}
        return S.PipelineRun(name=name, params=params, per_image=[*r.per_image, *_table(extra)],
                             member_val_psnr=r.member_val_psnr, fusion_val_psnr=r.fusion_val_psnr, costs=costs)

    runs = [run(f"s{k}-{h}", k, h, g) for k in range(3) for h, g in (("softmax", 0.0), ("residual", 0.1))]
    summary = S.summarize(runs, resamples=300)
    residual = summary["configurations"]["fusion.head=residual"]["against_best_member"]
    assert residual["fusion"]["gain"]["mean_diff"] == pytest.approx(0.1)
    assert residual["fusion"]["headroom_share"]["of_means"] == pytest.approx(0.25)
    assert residual["mean"]["gain"]["mean_diff"] == pytest.approx(-0.2) and "headroom_share" not in residual["mean"]
    assert residual["oracle:convex"]["cost"] == {"params": None, "macs_per_pixel": None}
    text = S.markdown(summary)
    table = text.split("### Fusions against the best member (dat+se)")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    heads = [f"| learned fusion ({label})" for label in summary["configurations"]]
    # The best member, the mean once (both configurations scored it alike), each head, then the oracles.
    assert [r.split(" | ")[0] for r in rows] == [
        "| best member: dat+se (selection on validation)", "| mean: uniform mean of the members", *heads,
        "| oracle:pixel: oracle: best member per pixel", "| oracle:convex: oracle: best convex weights per pixel (RGB)"]
    row = rows[2 + heads.index("| learned fusion (fusion.head=residual)")]
    assert "25.0%" in row and "| 18 | 9 |" in row and "| 10 | 824 |" in rows[0]
