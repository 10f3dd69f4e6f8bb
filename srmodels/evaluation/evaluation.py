"""Scoring: the pipeline's `test` and `score` steps, and one model on benchmark sets (`srmodels eval`).

The pipeline fuses cached outputs of the scored sets, then scores every model on them; nothing there runs a
backbone (their outputs come from the cache, ``srmodels.data.member_outputs``). ``srmodels eval`` reads benchmark folders
with the same planning as the pipeline's ``benchmark@<name>`` stages (``srmodels.data.prepare.plan_set``), runs its
model through a callable and scores each set. Both score an image with :func:`image_scores` and average a set
with :func:`mean_scores`, so a number means the same in a metrics file and in an eval table.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from srmodels.core import layout
from srmodels.data.member_outputs import check_output, load_output, rerun_hint
from srmodels.core.errors import DataError
from srmodels.models.fusion import fuse, fusion_inputs
from srmodels.data.images import ImageError, list_images, read_image, to_tensor, to_uint8, write_image
from srmodels.data.imresize import imresize_uint8
from srmodels.core.layout import cached_eval as member_dir, eval_set, eval_sets
from srmodels.metrics.psnr_ssim import calculate_psnr, calculate_ssim, rgb_to_y
from srmodels.core.files import write_json, write_text
from srmodels.core.params import flatten
from srmodels.data.prepare import Entry, check_entry, load_pair, plan_set, set_folders
from srmodels.evaluation.report import (bar_chart_png, comparison_table, curves_png, markdown_table, panel_image, read_curve,
                     weight_map_image, write_csv)
from srmodels.metrics.statistics import LEVEL, model_comparisons

log = logging.getLogger(__name__)


def check_member_outputs(dirs: list[Path], stem: str) -> tuple[int, ...]:
    """The common (3, H, W) of the members' cached outputs for one image; a ``DataError`` naming the bad file."""
    shapes = [(d / f"{stem}.npy", check_output(d / f"{stem}.npy")) for d in dirs]
    first_path, first = shapes[0]
    for path, shape in shapes[1:]:
        if shape != first:
            raise DataError(f"{path}: cached output of shape {shape} does not match {first} of {first_path} "
                            f"(a stale cache?); {rerun_hint(path)}")
    return first


def load_member_outputs(dirs: list[Path], stem: str) -> torch.Tensor:
    """(1, 3N, H, W) float32: the members' cached outputs for one image, concatenated on channels."""
    check_member_outputs(dirs, stem)
    return torch.from_numpy(np.concatenate([load_output(d / f"{stem}.npy") for d in dirs]).astype(np.float32))[None]


def fuse_eval_sets(net: torch.nn.Module, kind: str, members: list[str], cache_root: Path, prepared: Path,
                   out_dir: Path, *, self_ensemble: bool, device: torch.device) -> dict[str, int]:
    """Write ``sr/<set>/<stem>.png`` (fused, 8-bit) and ``weights/<set>/<stem>.png`` (who wins where).

    Every cached input is checked (headers and sizes only) before the previous output is removed, so a
    missing or cut cache file stops the step with its name instead of half way through.
    """
    for set_name in eval_sets(prepared):
        dirs = [member_dir(cache_root, m, set_name, self_ensemble) for m in members]
        for lr_path in list_images(eval_set(prepared, set_name).lr):
            check_member_outputs(dirs, lr_path.stem)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    net = net.to(device).eval()
    counts = {}
    with torch.inference_mode():
        for set_name in eval_sets(prepared):
            dirs = [member_dir(cache_root, m, set_name, self_ensemble) for m in members]
            lr_files = list_images(eval_set(prepared, set_name).lr)
            for lr_path in tqdm(lr_files, desc=f"fuse {set_name}", leave=False):
                cand = load_member_outputs(dirs, lr_path.stem).to(device)
                lr = to_tensor(read_image(lr_path)).to(device)
                weights = net(fusion_inputs(kind, cand, lr))
                fused = fuse(cand, weights).clamp_(0, 1)
                write_image(out_dir / layout.SR / set_name / f"{lr_path.stem}.png", to_uint8(fused))
                w = weights[0].float().cpu().numpy()
                if w.shape[1:] != fused.shape[2:]:  # one weight per image: picture it at full size
                    w = np.broadcast_to(w, (w.shape[0], *fused.shape[2:]))
                write_image(out_dir / layout.WEIGHTS / set_name / f"{lr_path.stem}.png", weight_map_image(w, members))
            counts[set_name] = len(lr_files)
    return counts


def image_scores(sr: np.ndarray, hr: np.ndarray, *, crop_border: int) -> dict[str, float]:
    """PSNR and SSIM of one 8-bit SR image against its HR, on Y and on RGB, ``crop_border`` pixels cropped
    on every side; unrounded (round only for display, and average the unrounded values)."""
    return {"psnr_y": calculate_psnr(sr, hr, crop_border=crop_border, y_channel=True),
            "ssim_y": calculate_ssim(sr, hr, crop_border=crop_border, y_channel=True),
            "psnr_rgb": calculate_psnr(sr, hr, crop_border=crop_border, y_channel=False),
            "ssim_rgb": calculate_ssim(sr, hr, crop_border=crop_border, y_channel=False)}


def mean_scores(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each score over a set's images (unrounded per-image values), rounded to 4 decimals."""
    return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}


def score_eval_sets(members: list[str], cache_root: Path, prepared: Path, test_dir: Path, *, scale: int,
                    crop_border: int, self_ensemble: bool
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """Scores of bicubic, each member (plain and x8), and the fusion on every set that has ground truth.

    Every SR image is quantised to 8 bit first, as it would be when saved. Returns (summary, per-image rows,
    per-image PSNR-Y): summary[set][model] = mean scores, sets without HR (LR-only test sets) listed as
    unscored; psnr_y[set][model] = unrounded per-image PSNR-Y in one image order (for paired comparisons).
    """
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    psnr_y: dict[str, dict[str, list[float]]] = {}
    for set_name in eval_sets(prepared):
        pairs = eval_set(prepared, set_name)
        hr_dir = pairs.hr
        if not hr_dir.is_dir():
            log.info("%s: LR only (no ground truth); SR images are in %s", set_name, test_dir / layout.SR / set_name)
            summary[set_name] = {"scored": False}
            continue
        per_model: dict[str, list[dict[str, float]]] = {}
        for hr_path in tqdm(list_images(hr_dir), desc=f"score {set_name}", leave=False):
            stem = hr_path.stem
            hr = read_image(hr_path)
            lr_path = pairs.lr / f"{stem}.png"
            lr = read_image(lr_path)
            outputs = {"bicubic": imresize_uint8(lr, scale=scale)}
            sources = {"bicubic": lr_path}
            for m in members:
                for name, ensemble in ((m, False), (f"{m}+se", True)):
                    if ensemble and not self_ensemble:
                        continue
                    path = member_dir(cache_root, m, set_name, ensemble) / f"{stem}.npy"
                    outputs[name] = to_uint8(torch.from_numpy(load_output(path).astype(np.float32)))
                    sources[name] = path
            fused = test_dir / layout.SR / set_name / f"{stem}.png"
            if not fused.is_file():
                raise DataError(f"{fused}: fused image missing; re-run the test stage (dvc repro -f test)")
            outputs["fusion"], sources["fusion"] = read_image(fused), fused
            for model, sr in outputs.items():
                if sr.shape != hr.shape:  # a stale cache or test output from other images or another scale
                    raise DataError(f"{sources[model]}: {model} output is {sr.shape[1]}x{sr.shape[0]}, but HR "
                                    f"{hr_path} is {hr.shape[1]}x{hr.shape[0]}; re-run the stages that wrote it")
                s = image_scores(sr, hr, crop_border=crop_border)
                per_model.setdefault(model, []).append(s)
                rows.append({"set": set_name, "image": stem, "model": model, **{k: round(v, 4) for k, v in s.items()}})
        summary[set_name] = {model: mean_scores(scores) for model, scores in per_model.items()}
        summary[set_name]["num_images"] = len(next(iter(per_model.values())))
        psnr_y[set_name] = {model: [s["psnr_y"] for s in scores] for model, scores in per_model.items()}
    return summary, rows, psnr_y


# ------------------------------------------------------------------------------ one model on benchmark sets
SSIM_WINDOW = 11  # srmodels.metrics.psnr_ssim's SSIM needs this many pixels per side after the border crop


@dataclass(frozen=True)
class BenchmarkSet:
    """One set to score: its name, where its HR (and given LR) images are, and what to read (HR first)."""

    name: str
    hr_dir: Path
    lr_dir: Path | None      # None: LR made from HR with the MATLAB bicubic
    entries: list[Entry]


def benchmark_set(name: str, folder: Path, scale: int, *, what: str) -> BenchmarkSet:
    """A benchmark folder (``folder/HR/`` or images in ``folder``, optional ``folder/LR_bicubic/X<scale>/``),
    planned as the pipeline's ``benchmark@<name>`` stage plans it; errors name ``what``."""
    hr_dir, lr_dir = set_folders(Path(folder), scale, what=what)
    return BenchmarkSet(name, hr_dir, lr_dir, plan_set(hr_dir, lr_dir, scale, what=what))


def check_benchmark_sets(sets: Sequence[BenchmarkSet], *, scale: int, crop_border: int,
                         sizes: list[tuple[Entry, tuple[int, int]]] | None = None) -> int:
    """Decode and check every image of every set (pairing, LR = HR / scale, big enough to score after the
    border crop), keeping nothing; returns the number of images. The first bad file stops it, named.

    ``sizes``, if given, receives each entry with its mod-cropped HR (height, width), for checks that need the
    model (its smallest input) without decoding every image again.
    """
    count = 0
    for bench in sets:
        for entry in tqdm(bench.entries, desc=f"checking {bench.name}", unit="img", disable=None, leave=False):
            size = check_entry(entry, scale)
            assert size is not None  # benchmark entries always have HR
            if min(size) - 2 * crop_border < SSIM_WINDOW:
                raise ImageError(f"{entry.origin}: {size[1]}x{size[0]} leaves less than {SSIM_WINDOW}x{SSIM_WINDOW} "
                                 f"pixels after the {crop_border}-pixel crop border (SSIM needs that many)")
            if sizes is not None:
                sizes.append((entry, size))
            count += 1
    return count


def score_benchmark_sets(sets: Sequence[BenchmarkSet], predict: Callable[[np.ndarray, Entry], np.ndarray], *,
                         scale: int, crop_border: int) -> dict[str, dict[str, Any]]:
    """Score one model on every set, in the given order: ``{set: {hr_folder, lr_folder, lr, num_images, mean,
    images}}``, ``mean`` as :func:`mean_scores`, ``images`` one row per image (scores rounded to 4 decimals).

    ``predict(lr, entry)`` returns the HxWx3 uint8 SR image of an LR image (quantised as when saved). HR is
    mod-cropped and a missing LR made with the MATLAB bicubic exactly as the pipeline prepares its sets.
    """
    results: dict[str, dict[str, Any]] = {}
    for bench in sets:
        per_image: list[dict[str, float]] = []
        rows: list[dict[str, Any]] = []
        for entry in tqdm(bench.entries, desc=bench.name, unit="img", disable=None, leave=False):
            hr, lr, _ = load_pair(entry, scale)
            assert hr is not None  # benchmark entries always have HR
            sr = predict(lr, entry)
            if sr.shape != hr.shape:  # a model of another scale, or one that pads its output
                raise DataError(f"{entry.origin}: SR output is {sr.shape[1]}x{sr.shape[0]}, HR is "
                                f"{hr.shape[1]}x{hr.shape[0]}")
            scores = image_scores(sr, hr, crop_border=crop_border)
            per_image.append(scores)
            rows.append({"image": entry.stem, **{k: round(v, 4) for k, v in scores.items()}})
            log.info("%s/%s: PSNR-Y %.4f dB, SSIM-Y %.4f", bench.name, entry.stem, scores["psnr_y"],
                     scores["ssim_y"])
        results[bench.name] = {
            "hr_folder": str(bench.hr_dir),
            "lr_folder": None if bench.lr_dir is None else str(bench.lr_dir),
            "lr": "given" if bench.lr_dir is not None else "matlab bicubic of HR",
            "num_images": len(rows),
            "mean": mean_scores(per_image),
            "images": rows,
        }
    return results


def set_comparisons(psnr_y: dict[str, dict[str, list[float]]], members: list[str], *, self_ensemble: bool,
                    resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Paired PSNR-Y comparisons (``srmodels.metrics.statistics``) on every scored set."""
    return {set_name: model_comparisons(scores, members, self_ensemble=self_ensemble, resamples=resamples,
                                        seed=seed)
            for set_name, scores in psnr_y.items()}


def score_metrics(summary: dict[str, Any], comparisons: dict[str, Any], finetune_dir: Path, fusion_dir: Path,
                  members: list[str], *, crop_border: int, self_ensemble: bool, cpu_isa: str,
                  bootstrap_resamples: int) -> dict[str, Any]:
    """The pipeline's metrics file: every scored set, the paired comparisons on each, and each model's best
    validation PSNR-Y. Y is the primary channel throughout (the NTIRE protocol: comparisons, model selection,
    the headline); each set's RGB figures are reported beside it."""
    def best_val(folder: Path) -> float:
        return json.loads((folder / layout.METRICS).read_text())["best_val_psnr"]

    return {
        "cpu_isa": cpu_isa,
        "protocol": {"crop_border": crop_border, "primary": "y",
                     "self_ensemble": self_ensemble, "comparisons": "paired PSNR-Y difference a - b per image, "
                     f"{LEVEL:.0%} percentile bootstrap over images ({bootstrap_resamples} resamples)"},
        "sets": summary,
        "comparisons": comparisons,
        "val": {"fusion_psnr_y": best_val(fusion_dir),
                **{f"{m}_psnr_y": best_val(finetune_dir / m) for m in members}},
    }


def flat_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """``{'<set>.<model>.<metric>': value, 'val.<model>_psnr_y': value, '<set>.<a>_vs_<b>.<stat>': value}``: the
    numbers of the scored sets, the validation scores and the comparisons (for MLflow)."""
    tree: dict[str, dict[str, Any]] = {s: {m: scores for m, scores in d.items() if isinstance(scores, dict)}
                                       for s, d in metrics["sets"].items() if d.get("scored", True)}
    tree.setdefault("val", {}).update(metrics["val"])
    for s, d in metrics["comparisons"].items():
        tree.setdefault(s, {}).update({label.replace(" ", "_"): {k: v for k, v in c.items()
                                                                 if isinstance(v, (int, float))}
                                       for label, c in d.items()})
    return {k: v for k, v in flatten(tree).items() if not isinstance(v, dict)}  # an empty mapping holds no number


def write_score_report(out_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
                       curves: dict[str, list[tuple[int, float]]]) -> list[Path]:
    """metrics.json, per_image.csv, table.md and plots/*.png under ``out_dir``; returns the files for MLflow."""
    summary, crop = metrics["sets"], metrics["protocol"]["crop_border"]
    key = f"psnr_{metrics['protocol']['primary']}"
    write_json(out_dir / layout.METRICS, metrics)
    write_csv(out_dir / layout.PER_IMAGE, rows)
    table_rows = [{"set": s, "model": m, **v} for s, d in summary.items() for m, v in d.items() if isinstance(v, dict)]
    write_text(out_dir / layout.SCORE_TABLE,
               markdown_table(table_rows) + "\n" + comparison_table(metrics["comparisons"]))
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    scored = [s for s, v in summary.items() if v.get("scored", True)]
    if scored:
        first = scored[0]
        bar_chart_png(plots / "psnr_bar.png", {m: v[key] for m, v in summary[first].items() if isinstance(v, dict)},
                      title=f"{first}: {key.replace('_', '-').upper()} (crop {crop})")
    curves_png(plots / "curves.png", curves, ylabel="validation PSNR-Y (dB)", title="training curves")
    return [out_dir / layout.SCORE_TABLE, out_dir / layout.PER_IMAGE, *sorted(plots.glob("*.png"))]


def training_curves(finetune_dir: Path, fusion_dir: Path, members: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Validation PSNR by epoch of every member and of the fusion net."""
    curves = {m: read_curve(finetune_dir / m / layout.CURVE, "val_psnr") for m in members}
    curves["fusion"] = read_curve(fusion_dir / layout.CURVE, "val_psnr")
    return curves


# ------------------------------------------------------------------------------------------- comparison panels
PANEL_CROP = 48  # HR pixels per side of a panel crop


def _best_window(score: np.ndarray, size: int, exclude: tuple[int, int] | None = None) -> tuple[int, int]:
    """Top-left (y, x) of the ``size`` x ``size`` window with the largest mean ``score`` (the first of equals),
    not overlapping the window at ``exclude``."""
    integral = np.pad(score, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    if exclude is not None:
        ey, ex = exclude
        sums[max(0, ey - size + 1):ey + size, max(0, ex - size + 1):ex + size] = -np.inf
        if not np.isfinite(sums).any():
            return exclude
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def write_panels(members: list[str], cache_root: Path, prepared: Path, test_dir: Path, out_dir: Path, *,
                 scale: int, self_ensemble: bool) -> list[Path]:
    """``<out_dir>/<set>/<stem>.png`` for every image with ground truth: the same crops of HR, bicubic, each
    member (as fused: x8 when self_ensemble) and the fusion, with each crop's PSNR-Y, plus the weight map.

    Two crops per image: where the members disagree most (per-pixel spread of their Y), and where the fusion
    gains most over the image's best member (squared-error difference), a different place.
    """
    written: list[Path] = []
    for set_name in eval_sets(prepared):
        pairs = eval_set(prepared, set_name)
        if not pairs.hr.is_dir():
            continue
        for hr_path in list_images(pairs.hr):
            stem = hr_path.stem
            hr = read_image(hr_path)
            outputs = {"bicubic": imresize_uint8(read_image(pairs.lr / f"{stem}.png"), scale=scale)}
            for m in members:
                path = member_dir(cache_root, m, set_name, self_ensemble) / f"{stem}.npy"
                outputs[f"{m}+se" if self_ensemble else m] = to_uint8(
                    torch.from_numpy(load_output(path).astype(np.float32)))
            outputs["fusion"] = read_image(test_dir / layout.SR / set_name / f"{stem}.png")
            weights = read_image(test_dir / layout.WEIGHTS / set_name / f"{stem}.png")[:hr.shape[0], :hr.shape[1]]
            size = min(PANEL_CROP, hr.shape[0], hr.shape[1])
            y_hr = rgb_to_y(hr)
            member_y = {n: rgb_to_y(img) for n, img in outputs.items() if n not in ("bicubic", "fusion")}
            best = min(member_y, key=lambda n: float(((member_y[n] - y_hr) ** 2).mean()))
            gain = (member_y[best] - y_hr) ** 2 - (rgb_to_y(outputs["fusion"]) - y_hr) ** 2
            disagree = _best_window(np.stack(list(member_y.values())).std(axis=0), size)
            gains = _best_window(gain, size, exclude=disagree)
            rows = []
            for (y, x), why in ((disagree, "members disagree"), (gains, f"fusion vs {best}")):
                crop_hr = hr[y:y + size, x:x + size]
                row = [(f"HR: {why}", crop_hr)]
                for name, img in outputs.items():
                    crop = img[y:y + size, x:x + size]
                    psnr = calculate_psnr(crop, crop_hr, crop_border=0, y_channel=True)
                    row.append((f"{name} {psnr:.2f}", crop))
                row.append(("weights", weights[y:y + size, x:x + size]))
                rows.append(row)
            path = out_dir / set_name / f"{stem}.png"
            write_image(path, panel_image(rows, legend=members))
            written.append(path)
    return written
