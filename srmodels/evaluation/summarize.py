"""Seed sweeps summarised (``srmodels summarize``): what a result is worth once the seed is a random draw too.

One pipeline run is one draw of every seeded choice (initial weights, crops, batch order). A sweep runs the same
configuration under several ``seed`` values (``dvc exp run --queue -S seed=K``); this module reads the finished
runs back and reports, for each configuration:

* per model, the scored set's mean PSNR-Y per seed, and their mean, standard deviation, min and max over seeds;
  the validation PSNR of every member and of the fusion likewise;
* the fusion's gain over its best member, the member chosen per seed on validation (as ``fusion.init:
  best_member`` chooses it, never on the scored set): per image and seed, with a 95% interval from
  :func:`srmodels.metrics.statistics.crossed_bootstrap` (seeds and images both resampled) and a verdict;
* between configurations that ran the same seeds (e.g. ``fusion.init`` random vs best_member), the fusion's
  paired difference, resampled the same way.

Runs are grouped into configurations by their params with ``seed`` (and the tracking settings) left out; a
configuration is named by the params in which it differs from the others. Runs come from DVC experiments
(:func:`dvc_runs`: params, ``per_image.csv`` of the score stage and ``metrics.json`` of the fusion stage at each
experiment's commit) or from MLflow (:func:`mlflow_runs`). Everything written is
deterministic: seeded resampling, fixed plot rendering.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from srmodels.core import layout
from srmodels.core.errors import UserError
from srmodels.core.files import write_json, write_text
from srmodels.core.params import flatten_text
from srmodels.metrics.statistics import crossed_bootstrap

log = logging.getLogger(__name__)

# Not part of what a configuration is: the seed is what a sweep varies, tracking never changes a result.
IGNORED_PARAMS = ("seed", "mlflow")
SUMMARY_MD, SUMMARY_JSON, SUMMARY_PNG = "summary.md", "summary.json", "summary.png"


@dataclass(frozen=True)
class PipelineRun:
    """What the summary needs of one finished pipeline run; params flattened to dotted keys, values as text."""

    name: str
    params: Mapping[str, str]
    per_image: Sequence[Mapping[str, str]]        # the score stage's per_image.csv rows
    member_val_psnr: Mapping[str, float]           # the fusion stage's validation PSNR of each member
    fusion_val_psnr: float                         # ... of the selected fusion checkpoint
    source: str = ""                               # where it was read from (an experiment's commit, a run id)
    costs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # the score stage's cost per row

    @property
    def seed(self) -> int:
        return int(float(self.params["seed"]))


def mlflow_runs(records: Iterable[Mapping[str, Any]]) -> list[PipelineRun]:
    """``srmodels.tracking.finished_pipelines``' records of MLflow runs as ``PipelineRun``s, by seed."""
    runs = [PipelineRun(name=r["name"], params=r["params"], source=r["source"],
                        per_image=parse_per_image(r["per_image"], f"MLflow run {r['name']}: {layout.PER_IMAGE}"),
                        member_val_psnr={k: float(v) for k, v in r["fusion_metrics"]["member_val_psnr"].items()},
                        fusion_val_psnr=float(r["fusion_metrics"]["best_val_psnr"]),
                        costs=r["score_metrics"].get("headroom", {}).get("costs", {}))
            for r in records]
    return sorted(runs, key=lambda r: (r.seed, r.name))


def parse_per_image(text: str, source: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    missing = {"set", "image", "model", "psnr_y"} - set(rows[0] if rows else ())
    if missing:
        raise UserError(f"{source}: not a per-image score table (missing {', '.join(sorted(missing))})")
    return rows


# --------------------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------------------
def dvc_runs(root: str | Path, names: Sequence[str] | None = None, *, all_commits: bool = False) -> list[PipelineRun]:
    """Every successful DVC experiment of the repository at ``root`` (of HEAD's baseline unless ``all_commits``).

    ``names`` selects experiments by name (all of them must exist and have finished).
    """
    import dvc.api  # here: the rest of srmodels runs without DVC's import cost

    root = Path(root)
    if not (root / ".dvc").is_dir():
        raise UserError(f"{root}: not a DVC repository (no .dvc folder)")
    rows = dvc.api.exp_show(repo=str(root), num=-1 if all_commits else 1)
    found = {r["Experiment"]: r for r in rows if r.get("typ") in ("branch_commit", "branch_base")
             and r.get("Experiment")}
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise UserError(f"{root}: no experiment named {', '.join(unknown)} (see `dvc exp show`)")
        chosen = [found[n] for n in names]
    else:
        chosen = list(found.values())
    runs = []
    for row in chosen:
        name, rev, state = row["Experiment"], row["rev"], row.get("State")
        if state not in (None, "Success"):
            if names:
                raise UserError(f"{root}: experiment {name} has not finished ({state})")
            log.info("skipping experiment %s (%s)", name, state)
            continue
        params = dvc.api.params_show(repo=str(root), rev=rev)
        paths = params["paths"]
        try:
            per_image = dvc.api.read(f"{paths['score']}/{layout.PER_IMAGE}", repo=str(root), rev=rev)
            fusion = json.loads(dvc.api.read(f"{paths['fusion']}/{layout.METRICS}", repo=str(root), rev=rev))
        except Exception as err:  # noqa: BLE001 - DVC raises many kinds for an absent or uncached output
            raise UserError(f"{root}: experiment {name} ({rev}): its score or fusion outputs cannot be read "
                            f"({type(err).__name__}: {err})") from err
        runs.append(PipelineRun(name=name, params=flatten_text(params), source=f"dvc:{rev}",
                                per_image=parse_per_image(per_image, f"{name}:{paths['score']}/{layout.PER_IMAGE}"),
                                member_val_psnr={k: float(v) for k, v in fusion["member_val_psnr"].items()},
                                fusion_val_psnr=float(fusion["best_val_psnr"]),
                                costs=_score_costs(root, paths, rev)))
    return sorted(runs, key=lambda r: (r.seed, r.name))


def _score_costs(root: Path, paths: Mapping[str, str], rev: str) -> dict[str, Any]:
    """The rows' costs from the score stage's metrics.json at ``rev``; none where it has none (older runs)."""
    import dvc.api

    try:
        score = json.loads(dvc.api.read(f"{paths['score']}/{layout.METRICS}", repo=str(root), rev=rev))
    except Exception:  # noqa: BLE001 - absent in runs made before the score stage recorded costs
        return {}
    return score.get("headroom", {}).get("costs", {})


# --------------------------------------------------------------------------------------------------------------
# Grouping and statistics
# --------------------------------------------------------------------------------------------------------------
def _config(run: PipelineRun) -> dict[str, str]:
    return {k: v for k, v in run.params.items() if k.split(".")[0] not in IGNORED_PARAMS}


def configurations(runs: Sequence[PipelineRun]) -> dict[str, list[PipelineRun]]:
    """Runs grouped by their params other than the seed; each group named by what sets it apart.

    Within a group a seed counts once: a second run of the same seed (the workspace re-run as an experiment)
    must have the same per-image scores, else the runs are not comparable and the user is told which.
    """
    if not runs:
        raise UserError("no finished pipeline runs to summarise (queue some: see README 'Seed sweeps')")
    configs = [_config(r) for r in runs]
    keys = sorted(set().union(*configs))
    varying = [k for k in keys if len({c.get(k) for c in configs}) > 1]
    groups: dict[str, list[PipelineRun]] = {}
    for run, config in zip(runs, configs):
        label = ", ".join(f"{k}={config.get(k, '(unset)')}" for k in varying) or "all runs"
        group = groups.setdefault(label, [])
        twin = next((r for r in group if r.seed == run.seed), None)
        if twin is None:
            group.append(run)
        elif _scores(twin) != _scores(run):
            raise UserError(f"runs {twin.name} and {run.name} share seed {run.seed} and params but not their "
                            f"scores; summarise one of them (--exp)")
        else:
            log.info("%s repeats %s (seed %d): counted once", run.name, twin.name, run.seed)
    return groups


def _scores(run: PipelineRun) -> list[tuple[str, str, str, str]]:
    return [(r["set"], r["image"], r["model"], r["psnr_y"]) for r in run.per_image]


def _table(run: PipelineRun, set_name: str, metric: str) -> dict[str, dict[str, float]]:
    """``{model: {image: value}}`` of one scored set."""
    out: dict[str, dict[str, float]] = {}
    for r in run.per_image:
        if r["set"] == set_name and r.get(metric) not in (None, ""):
            try:
                out.setdefault(r["model"], {})[r["image"]] = float(r[metric])
            except ValueError:
                raise UserError(f"run {run.name} ({run.source}): {metric} of {r['model']} on {r['image']} is "
                                f"not a number: {r[metric]!r}") from None
    return out


def _grid(runs: Sequence[PipelineRun], set_name: str, metric: str = "psnr_y") -> tuple[list[str], list[str],
                                                                                       dict[str, np.ndarray]]:
    """Models, images and ``{model: seeds x images}`` for one set; every run must hold the same images."""
    tables = [_table(r, set_name, metric) for r in runs]
    if not tables[0]:
        sets = sorted({row["set"] for row in runs[0].per_image})
        raise UserError(f"run {runs[0].name} scored no set '{set_name}' (it has: {', '.join(sets)}); pass --set")
    models = list(tables[0])
    images = list(tables[0][models[0]])
    for run, table in zip(runs, tables):
        for model in models:
            if list(table.get(model, {})) != images:
                raise UserError(f"run {run.name}: set '{set_name}' holds other images or models than run "
                                f"{runs[0].name}'s; runs of one summary must be scored alike")
    return models, images, {m: np.array([[t[m][i] for i in images] for t in tables]) for m in models}


def _spread(values: Iterable[float]) -> dict[str, Any]:
    v = np.asarray(list(values), dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)), 4) if v.size > 1 else None,
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4),
            "per_seed": [round(float(x), 4) for x in v]}


def best_member_reference(run: PipelineRun, models: Sequence[str]) -> str:
    """The member the fusion must beat: best on validation; its x8 output where the fusion fused x8 outputs."""
    best = max(run.member_val_psnr, key=lambda m: run.member_val_psnr[m])
    return f"{best}+se" if f"{best}+se" in models else best


def summarize_configuration(runs: Sequence[PipelineRun], *, set_name: str, resamples: int,
                            seed: int) -> dict[str, Any]:
    models, images, psnr = _grid(runs, set_name)
    _, _, ssim = _grid(runs, set_name, "ssim_y")
    out: dict[str, Any] = {"runs": [r.name for r in runs], "seeds": [r.seed for r in runs], "images": images,
                           "models": {}}
    for model in models:
        row = {"psnr_y": _spread(psnr[model].mean(axis=1))}
        if model in ssim:
            row["ssim_y"] = _spread(ssim[model].mean(axis=1))
        out["models"][model] = row
    members = list(runs[0].member_val_psnr)
    out["val"] = {**{m: _spread(r.member_val_psnr[m] for r in runs) for m in members},
                  "fusion": _spread(r.fusion_val_psnr for r in runs)}
    if "fusion" in psnr:
        refs = [best_member_reference(r, models) for r in runs]
        diffs = np.stack([psnr["fusion"][k] - psnr[ref][k] for k, ref in enumerate(refs)])
        out["gain_over_best_member"] = {
            "reference_per_seed": refs,
            "per_seed": [round(float(x), 4) for x in diffs.mean(axis=1)],
            set_name: crossed_bootstrap(diffs, resamples=resamples, seed=seed),
            "val": _spread(r.fusion_val_psnr - max(r.member_val_psnr.values()) for r in runs)}
        out["against_best_member"] = _against_best_member(runs, psnr, refs, resamples=resamples, seed=seed)
    return out


def _against_best_member(runs: Sequence[PipelineRun], psnr: Mapping[str, np.ndarray], refs: Sequence[str], *,
                         resamples: int, seed: int) -> dict[str, Any]:
    """Every fusion-like row (the learned fusion, the baselines, the oracles) minus the seed's best member, per
    image and seed, with the crossed interval; the learned fusion's share of the convex oracle's headroom
    (ratio of the mean gains, and per seed); each row's cost as the score stage recorded it."""
    from srmodels.evaluation import headroom  # its row names; it loads torch, which the rest of this module does not need

    out: dict[str, Any] = {}
    for row in ("fusion", *headroom.BASELINES, *headroom.ORACLES):
        if row not in psnr:
            continue
        diffs = np.stack([psnr[row][k] - psnr[ref][k] for k, ref in enumerate(refs)])
        out[row] = {"per_seed": [round(float(x), 4) for x in diffs.mean(axis=1)],
                    "gain": crossed_bootstrap(diffs, resamples=resamples, seed=seed),
                    "cost": dict(runs[0].costs.get(row, {}))}
    room = out.get(headroom.HEADROOM)
    if "fusion" in out and room:
        mean_room = float(np.mean(room["per_seed"]))
        out["fusion"]["headroom_share"] = {
            "of_means": round(out["fusion"]["gain"]["mean_diff"] / mean_room, 4) if mean_room > 0 else None,
            "per_seed": [round(g / r, 4) if r > 0 else None
                         for g, r in zip(out["fusion"]["per_seed"], room["per_seed"])]}
    ref_cost = runs[0].costs.get(refs[0], {}) if len(set(refs)) == 1 else {}
    out["reference"] = {"per_seed": list(refs), "cost": dict(ref_cost)}
    return out


def compare_configurations(groups: Mapping[str, Sequence[PipelineRun]], *, set_name: str, resamples: int,
                           seed: int) -> dict[str, Any]:
    """The fusion of each pair of configurations, paired by seed and image (over the seeds both ran)."""
    out: dict[str, Any] = {}
    for (a, runs_a), (b, runs_b) in combinations(groups.items(), 2):
        by_seed_b = {r.seed: r for r in runs_b}
        pairs = [(r, by_seed_b[r.seed]) for r in runs_a if r.seed in by_seed_b]
        if not pairs:
            continue
        _, images_a, psnr_a = _grid([p[0] for p in pairs], set_name)
        _, images_b, psnr_b = _grid([p[1] for p in pairs], set_name)
        if images_a != images_b or "fusion" not in psnr_a or "fusion" not in psnr_b:
            continue
        out[f"fusion ({a}) vs fusion ({b})"] = crossed_bootstrap(psnr_a["fusion"] - psnr_b["fusion"],
                                                                 resamples=resamples, seed=seed)
    return out


def summarize(runs: Sequence[PipelineRun], *, set_name: str = "test", resamples: int = 10000,
              seed: int = 0) -> dict[str, Any]:
    groups = configurations(runs)
    return {
        "set": set_name,
        "protocol": {"metric": "PSNR-Y per image as scored by the score stage (metrics.crop_border)",
                     "interval": f"95% percentile bootstrap, seeds and images resampled ({resamples} resamples, "
                                 f"seed {seed})",
                     "best_member": "the member with the best validation PSNR in the same run"},
        "configurations": {label: summarize_configuration(g, set_name=set_name, resamples=resamples, seed=seed)
                           for label, g in groups.items()},
        "between_configurations": compare_configurations(groups, set_name=set_name, resamples=resamples,
                                                         seed=seed),
    }


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def _pm(s: Mapping[str, Any], digits: int = 2) -> str:
    sd = "n/a" if s["sd"] is None else f"{s['sd']:.{max(digits, 2)}f}"
    return f"{s['mean']:.{digits}f} ± {sd}"


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def _interval(c: Mapping[str, Any]) -> str:
    return f"{_signed(c['mean_diff'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}]"


def markdown(summary: Mapping[str, Any]) -> str:
    set_name = summary["set"]
    lines: list[str] = []
    for label, conf in summary["configurations"].items():
        n_seeds, n_images = len(conf["seeds"]), len(conf["images"])
        lines += [f"### {label}", "",
                  f"{n_seeds} seeds ({', '.join(map(str, conf['seeds']))}) x {n_images} images of set "
                  f"`{set_name}`; mean ± standard deviation over seeds of each seed's mean, and the range.", "",
                  f"| model | {set_name} PSNR-Y (dB) | min - max | {set_name} SSIM-Y | val PSNR-Y (dB) |",
                  "|---|---|---|---|---|"]
        for model, row in conf["models"].items():
            val = conf["val"].get(model.removesuffix("+se"))
            # Validation scores the cached outputs the fusion learns from: x8 ones when self-ensemble is on.
            show_val = val is not None and (model == "fusion" or model.endswith("+se")
                                            or f"{model}+se" not in conf["models"])
            p = row["psnr_y"]
            lines.append(f"| {model} | {_pm(p)} | {p['min']:.2f} - {p['max']:.2f} | "
                         f"{_pm(row['ssim_y'], 4) if 'ssim_y' in row else 'n/a'} | "
                         f"{_pm(val) if show_val else ''} |")
        gain = conf.get("gain_over_best_member")
        if gain:
            g = gain[set_name]
            refs = ", ".join(dict.fromkeys(gain["reference_per_seed"]))
            lines += ["", f"Fusion minus its best member (chosen per seed on validation: {refs}): "
                          f"{set_name} {_interval(g)} dB (95% CI, seeds and images resampled), "
                          f"{g['verdict']}; the fusion's seed mean is ahead in {g['seed_wins']} of "
                          f"{g['num_seeds']} seeds, behind in {g['seed_losses']}. "
                          f"On validation: {_signed(gain['val']['mean'])} dB mean, worst seed "
                          f"{_signed(gain['val']['min'])} dB."]
            if "warning" in g:
                lines.append(f"Note: {g['warning']}.")
        lines.append("")
    lines += _headroom_markdown(summary)
    between = summary["between_configurations"]
    if between:
        lines += ["### Between configurations", "",
                  f"| comparison | {set_name} PSNR-Y difference (dB) [95% CI] | seeds ahead / behind | verdict |",
                  "|---|---|---|---|"]
        for name, c in between.items():
            lines.append(f"| {name} | {_interval(c)} | {c['seed_wins']} / {c['seed_losses']} | {c['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def _headroom_markdown(summary: Mapping[str, Any]) -> list[str]:
    """One table over every configuration: the best member, the baselines and oracles (shown once when every
    configuration scored them alike, as runs that differ only in the fusion do), and each configuration's
    learned fusion; gains over the best member with the crossed interval, the fusion's share of the headroom,
    parameters and MACs per output pixel (members included)."""
    from srmodels.evaluation import headroom

    set_name, confs = summary["set"], summary["configurations"]
    against = {label: c["against_best_member"] for label, c in confs.items() if "against_best_member" in c}
    if not against:
        return []
    first = next(iter(against))
    refs = sorted({r for a in against.values() for r in a["reference"]["per_seed"]})

    def same(row: str) -> bool:
        return all(a.get(row, {}).get("per_seed") == against[first].get(row, {}).get("per_seed")
                   for a in against.values())

    def line(label: str, conf: Mapping[str, Any], row: str, model: str) -> str:
        a = conf["against_best_member"].get(row) if row != "reference" else None
        psnr = conf["models"][model]["psnr_y"]
        cost = (a or conf["against_best_member"]["reference"]).get("cost", {})
        gain = "" if a is None else (f"{_interval(a['gain'])} | {a['gain']['seed_wins']} / "
                                     f"{a['gain']['seed_losses']}")
        share = a.get("headroom_share", {}).get("of_means") if a else None
        params = "" if cost.get("params") is None else f"{cost['params']:,}"
        macs = "" if cost.get("macs_per_pixel") is None else f"{cost['macs_per_pixel']:,.0f}"
        return (f"| {label} | {_pm(psnr)} | {gain or ' | '} | {'' if share is None else f'{share:.1%}'} | "
                f"{params} | {macs} |")

    conf0 = confs[first]
    lines = [f"### Fusions against the best member ({', '.join(refs)})", "",
             f"Per seed, the member with the best validation PSNR-Y (x8 outputs where the fusion fuses them) is "
             f"the reference; gains are {set_name} PSNR-Y differences per image and seed, 95% CI resampling "
             f"both. Share of headroom: (row - best member) / ({headroom.HEADROOM} - best member), of the means. "
             f"Cost: members included; oracles look at HR and have none.", "",
             f"| row | {set_name} PSNR-Y | gain (dB) [95% CI] | seeds ahead / behind | share of headroom | "
             "params | MACs / output px |", "|:---|---:|---:|---:|---:|---:|---:|"]
    ref_model = conf0["against_best_member"]["reference"]["per_seed"][0]
    lines.append(line(f"best member: {', '.join(refs)} (selection on validation)", conf0, "reference", ref_model))
    for row in headroom.BASELINES:
        if row in conf0["against_best_member"] and same(row):
            lines.append(line(f"{row}: {headroom.LABELS[row]}", conf0, row, row))
    for label, conf in confs.items():
        if "fusion" in conf.get("against_best_member", {}):
            lines.append(line(f"learned fusion ({label})", conf, "fusion", "fusion"))
    for label, conf in confs.items():  # baselines that differ between configurations get a row each
        for row in headroom.BASELINES:
            if row in conf.get("against_best_member", {}) and not same(row):
                lines.append(line(f"{row} ({label})", conf, row, row))
    for row in headroom.ORACLES:
        if row in conf0["against_best_member"]:
            lines.append(line(f"{row}: {headroom.LABELS[row]}", conf0, row, row))
    return lines + [""]


def plot_png(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Left: each model's per-seed set mean (one point per seed) with mean ± sd; right: the fusion's gain
    over its best member per seed, with the crossed-bootstrap interval. One marker per configuration."""
    from matplotlib import style

    from srmodels.evaluation.report import colours_for, new_figure, save_png

    set_name, confs = summary["set"], summary["configurations"]
    markers = "os^Dv<>p"
    with style.context("default"):
        fig = new_figure()
        fig.set_size_inches(10.0, 4.2)
        ax, gx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        models = list(dict.fromkeys(m for c in confs.values() for m in c["models"]))
        bases = list(dict.fromkeys(m.split("+")[0] for m in models))
        colour = {b: tuple(v / 255 for v in rgb) for b, rgb in zip(bases, colours_for(bases))}
        width = 0.6 / max(len(confs), 1)
        for k, (label, conf) in enumerate(confs.items()):
            offset = (k - (len(confs) - 1) / 2) * width
            for x, model in enumerate(models):
                if model not in conf["models"]:
                    continue
                p = conf["models"][model]["psnr_y"]
                ys = p["per_seed"]
                # Points spread across the slot in seed order (deterministic, no random jitter).
                xs = x + offset + np.linspace(-0.3, 0.3, len(ys)) * width
                ax.scatter(xs, ys, s=14, marker=markers[k % len(markers)], color=colour[model.split("+")[0]],
                           edgecolors="black", linewidths=0.3, zorder=3, label=label if x == 0 else None)
                ax.errorbar(x + offset, p["mean"], yerr=p["sd"] or 0.0, fmt="_", color="black", capsize=3,
                            markersize=10, zorder=4)
            gain = conf.get("gain_over_best_member")
            if gain:
                g = gain[set_name]
                ys = gain["per_seed"]
                gx.scatter(np.full(len(ys), k, dtype=float) + np.linspace(-0.15, 0.15, len(ys)), ys, s=16,
                           marker=markers[k % len(markers)], color=colour.get("fusion", (0.5, 0.5, 0.5)),
                           edgecolors="black", linewidths=0.3, zorder=3)
                gx.errorbar(k, g["mean_diff"], yerr=[[g["mean_diff"] - g["ci_low"]], [g["ci_high"] - g["mean_diff"]]],
                            fmt="_", color="black", capsize=4, markersize=12, zorder=4)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylabel(f"{set_name} PSNR-Y (dB), mean over images")
        ax.set_title("per seed (points), mean ± sd (bars)")
        ax.grid(axis="y", alpha=0.3)
        if len(confs) > 1:
            ax.legend(fontsize=7, loc="lower left")
        gx.axhline(0.0, color="grey", linewidth=0.8)
        gx.set_xticks(range(len(confs)), [_short(label) for label in confs], rotation=15, ha="right", fontsize=8)
        gx.set_xlim(-0.6, len(confs) - 0.4)
        gx.set_ylabel("fusion - best member (dB)")
        gx.set_title("per seed (points), 95% CI over seeds x images")
        gx.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        return save_png(fig, path)


def _short(label: str, limit: int = 40) -> str:
    return label if len(label) <= limit else label[:limit - 3] + "..."


def write_summary(out_dir: str | Path, summary: Mapping[str, Any]) -> list[Path]:
    out_dir = Path(out_dir)
    write_text(out_dir / SUMMARY_MD, markdown(summary))
    write_json(out_dir / SUMMARY_JSON, summary)
    return [out_dir / SUMMARY_MD, out_dir / SUMMARY_JSON, plot_png(out_dir / SUMMARY_PNG, summary)]
