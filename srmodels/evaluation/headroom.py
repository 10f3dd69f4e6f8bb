"""The fusion among its rivals: training-free baselines and oracles that look at HR, on every scored set.

What a lab needs to judge a fusion of its members, all from the cached member outputs (nothing re-runs a
member) and scored like the fusion (8-bit, the score stage's metrics):

* baselines: ``mean`` (the members' uniform mean) and ``lsq`` (global least-squares weights, one per member,
  fitted on the fusion-training split by the ``baselines`` stage); selection alone is the validation-best
  member's own row;
* oracles, which look at HR and are never selectable: ``oracle:image`` (per image, the member with the best
  PSNR-Y), ``oracle:pixel`` (per pixel, the member nearest to HR in RGB), ``oracle:convex`` (per pixel, the point
  of the members' convex hull nearest to HR in RGB: one weight vector per pixel shared by the three channels, as
  the learned heads weight; the headroom's upper end) and ``oracle:convex-y`` (a convex weighting that matches
  HR's luma where the hull allows: the bound on PSNR-Y itself before 8-bit rounding).

Every row fuses what the fusion fuses: the x8 outputs when ``inference.self_ensemble`` is on. Each fusion-like row
is compared with the validation-best member by the paired bootstrap of the score stage, and each learned row
gets its share of the headroom, ``(row - best member) / (oracle:convex - best member)``. Costs (parameters and
multiply-accumulates per output pixel) come from the ``baselines`` and ``fusion`` stages' records.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from srmodels.evaluation import ensembles
from srmodels.core import layout
from srmodels.data.member_outputs import load_output
from srmodels.data.images import list_images, read_image, to_uint8
from srmodels.metrics.statistics import paired_bootstrap

BASELINES = ("mean", "lsq")
ORACLES = ("oracle:image", "oracle:pixel", "oracle:convex", "oracle:convex-y")
HEADROOM = "oracle:convex"  # the upper end of the headroom a learned fusion's share is measured against
LABELS = {"mean": "uniform mean of the members", "lsq": "global least-squares weights",
          "oracle:image": "oracle: best member per image", "oracle:pixel": "oracle: best member per pixel",
          "oracle:convex": "oracle: best convex weights per pixel (RGB)",
          "oracle:convex-y": "oracle: best convex weights per pixel (luma, the PSNR-Y bound)"}


def reference(members: Sequence[str], best: str, self_ensemble: bool) -> str:
    """The row every fusion is compared with: the validation-best member, as fused (x8 with self-ensemble)."""
    if best not in members:
        raise ValueError(f"best member {best!r} is not one of {list(members)}")
    return f"{best}+se" if self_ensemble else best


def rival_outputs(cands: torch.Tensor, hr: np.ndarray, lsq_weights: Sequence[float],
                  member_psnr_y: Sequence[float]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every baseline's and oracle's 8-bit output for one image, and the seconds each took.

    ``cands``: (N, 3, H, W) in [0, 1]; ``hr``: HxWx3 uint8; ``member_psnr_y``: each member's PSNR-Y on this
    image (what the per-image oracle picks by).
    """
    target = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1).double() / 255.0
    makers = {
        "mean": lambda: ensembles.uniform_mean(cands),
        "lsq": lambda: ensembles.weighted(cands, lsq_weights),
        "oracle:image": lambda: cands[ensembles.per_image_best_index(member_psnr_y)],
        "oracle:pixel": lambda: ensembles.oracle_pixel_best(cands, target)[0],
        "oracle:convex": lambda: ensembles.oracle_convex(cands, target)[0],
        "oracle:convex-y": lambda: ensembles.oracle_convex_luma(cands, target)[0],
    }
    outputs, seconds = {}, {}
    for name, make in makers.items():
        start = time.perf_counter()
        outputs[name] = to_uint8(make())
        seconds[name] = time.perf_counter() - start
    return outputs, seconds


def score_rivals(members: Sequence[str], cache_root: Path, prepared: Path, baselines: Mapping[str, Any], *,
                 psnr_y: Mapping[str, Mapping[str, Sequence[float]]], self_ensemble: bool, score: Any
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, float]]]], dict[str, float]]:
    """Score every baseline and oracle on every scored set (those in ``psnr_y``, in its image order).

    ``score(sr, hr)`` is the score stage's per-image scorer; ``psnr_y[set][model]`` the members' per-image
    PSNR-Y already scored. Returns (per-image rows, ``{set: {row: [scores per image]}}``, mean seconds per
    image of each row).
    """
    weights = [baselines["least_squares"]["weights"][m] for m in members]
    rows: list[dict[str, Any]] = []
    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    seconds: dict[str, list[float]] = {}
    suffix = "+se" if self_ensemble else ""
    for set_name in psnr_y:
        pairs = layout.eval_set(prepared, set_name)
        hr_paths = list_images(pairs.hr)
        scores[set_name] = {}
        for k, hr_path in enumerate(tqdm(hr_paths, desc=f"rivals {set_name}", leave=False)):
            hr = read_image(hr_path)
            cands = torch.from_numpy(np.stack([
                load_output(layout.cached_eval(cache_root, m, set_name, self_ensemble) / f"{hr_path.stem}.npy")
                .astype(np.float32) for m in members]))
            member_psnr = [psnr_y[set_name][f"{m}{suffix}"][k] for m in members]
            outputs, took = rival_outputs(cands, hr, weights, member_psnr)
            for name, sr in outputs.items():
                s = score(sr, hr)
                scores[set_name].setdefault(name, []).append(s)
                rows.append({"set": set_name, "image": hr_path.stem, "model": name,
                             **{key: round(v, 4) for key, v in s.items()}})
                seconds.setdefault(name, []).append(took[name])
    return rows, scores, {name: float(np.mean(v)) for name, v in seconds.items()}


def costs(members: Sequence[str], baselines: Mapping[str, Any], fusion_cost: Mapping[str, Any] | None, *,
          self_ensemble: bool) -> dict[str, dict[str, Any]]:
    """Parameters and multiply-accumulates per output pixel of every row: members alone (plain and x8), and
    every fusion with its members included. Oracles need HR: no cost is given for them."""
    member = baselines["costs"]
    key = "macs_per_pixel_se" if self_ensemble else "macs_per_pixel"
    out: dict[str, dict[str, Any]] = {}
    for m in members:
        out[m] = {"params": member[m]["params"], "macs_per_pixel": member[m]["macs_per_pixel"]}
        out[f"{m}+se"] = {"params": member[m]["params"], "macs_per_pixel": member[m]["macs_per_pixel_se"]}
    total_params = sum(member[m]["params"] for m in members)
    total_macs = sum(member[m][key] for m in members)
    combine = 3 * len(members)  # one multiply-add per member and channel
    for name in BASELINES:
        out[name] = {"params": total_params + (len(members) if name == "lsq" else 0),
                     "macs_per_pixel": total_macs + combine}
    if fusion_cost is not None:
        out["fusion"] = {"params": total_params + fusion_cost["params"],
                         "macs_per_pixel": total_macs + fusion_cost["macs_per_pixel"]}
    for name in ORACLES:
        out[name] = {"params": None, "macs_per_pixel": None}
    return out


def compare_with_reference(psnr_y: Mapping[str, Sequence[float]], ref: str, rows: Sequence[str], *,
                           resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Each row minus the reference member, per image, with the paired bootstrap interval; learned rows (those
    not baselines or oracles) also get their share of the headroom."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row not in psnr_y:
            continue
        out[row] = paired_bootstrap(psnr_y[row], psnr_y[ref], resamples=resamples, seed=seed)
    room = out.get(HEADROOM, {}).get("mean_diff")
    for row, c in out.items():
        if row in BASELINES or row in ORACLES:
            continue
        c["headroom_share"] = None if not room or room <= 0 else c["mean_diff"] / room
    return out


def markdown(headroom: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """One table per scored set: the reference member, the baselines, the learned fusion and the oracles, with
    mean PSNR-Y / SSIM-Y, the gain over the reference [95% CI], the share of the headroom and the cost."""
    ref, cost = headroom["reference"], headroom["costs"]
    lines = []
    for set_name, rows in headroom["sets"].items():
        lines += [f"### {set_name}: fusions against the best validation member ({ref})", "",
                  "| row | PSNR-Y | SSIM-Y | gain over " + ref + " (dB) [95% CI] | share of headroom | params | "
                  "MACs / output px |", "|:---|---:|---:|---:|---:|---:|---:|"]
        for name in (ref, *BASELINES, "fusion", *ORACLES):
            if name not in summary[set_name]:
                continue
            s, c, k = summary[set_name][name], rows.get(name), cost.get(name, {})
            gain = "" if c is None else f"{c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            share = "" if c is None or c.get("headroom_share") is None else f"{c['headroom_share']:.1%}"
            params = "" if k.get("params") is None else f"{k['params']:,}"
            macs = "" if k.get("macs_per_pixel") is None else f"{k['macs_per_pixel']:,.0f}"
            label = LABELS.get(name, "selection: the best validation member" if name == ref else "learned fusion")
            lines.append(f"| {name} ({label}) | {s['psnr_y']:.4f} | {s['ssim_y']:.4f} | {gain} | {share} | "
                         f"{params} | {macs} |")
        lines.append("")
    return "\n".join(lines)
