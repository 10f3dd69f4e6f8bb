"""Stage `score`: PSNR/SSIM (Y, NTIRE protocol; and RGB) of bicubic, every member (plain and x8) and the fusion."""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

import json
from pathlib import Path
from typing import Any

from srmodels.evaluation import headroom
from srmodels.core import layout
from srmodels.evaluation.evaluation import (flat_scores, image_scores, mean_scores, score_eval_sets, score_metrics,
                                 set_comparisons, training_curves, write_panels, write_score_report)
from srmodels.core.layout import SCALE
from srmodels.core.files import staged


def main(params: dict[str, Any]) -> None:
    paths, members, mp = params["paths"], params["fusion"]["members"], params["metrics"]
    self_ensemble, crop = params["inference"]["self_ensemble"], mp["crop_border"]
    finetune_dir, fusion_dir, cache = Path(paths["finetune"]), Path(paths["fusion"]), Path(paths["cache"])
    summary, rows, psnr_y = score_eval_sets(members, cache, Path(paths["prepared"]), Path(paths["test"]),
                                            scale=SCALE, crop_border=crop, self_ensemble=self_ensemble)
    # The baselines and oracles, scored alike and merged in as rows of their own.
    baselines = json.loads((Path(paths["baselines"]) / layout.BASELINES).read_text())
    fusion_metrics = json.loads((fusion_dir / layout.METRICS).read_text())
    rival_rows, rival_scores, seconds = headroom.score_rivals(
        members, cache, Path(paths["prepared"]), baselines, psnr_y=psnr_y, self_ensemble=self_ensemble,
        score=lambda sr, hr: image_scores(sr, hr, crop_border=crop))
    rows += rival_rows
    for set_name, by_row in rival_scores.items():
        for name, scores in by_row.items():
            summary[set_name][name] = mean_scores(scores)
            psnr_y[set_name][name] = [s["psnr_y"] for s in scores]
    comparisons = set_comparisons(psnr_y, members, self_ensemble=self_ensemble, **mp["bootstrap"])
    metrics = score_metrics(summary, comparisons, finetune_dir, fusion_dir, members, crop_border=crop,
                            self_ensemble=self_ensemble, cpu_isa=params["cpu_isa"],
                            bootstrap_resamples=mp["bootstrap"]["resamples"])
    ref = headroom.reference(members, baselines["best_member"], self_ensemble)
    metrics["headroom"] = {
        "reference": ref, "definitions": headroom.LABELS,
        "least_squares_weights": baselines["least_squares"]["weights"],
        "sets": {s: headroom.compare_with_reference(p, ref, ["fusion", *headroom.BASELINES, *headroom.ORACLES],
                                                    **mp["bootstrap"]) for s, p in psnr_y.items()},
        "costs": headroom.costs(members, baselines, fusion_metrics.get("cost"), self_ensemble=self_ensemble)}
    with staged(Path(paths["score"]), paths["work"]) as out_dir:
        files = write_score_report(out_dir, metrics, rows, training_curves(finetune_dir, fusion_dir, members))
        with (out_dir / layout.SCORE_TABLE).open("a") as table:
            table.write("\n" + headroom.markdown(metrics["headroom"], summary))
        panels = write_panels(members, Path(paths["cache"]), Path(paths["prepared"]), Path(paths["test"]),
                              out_dir / "panels", scale=SCALE, self_ensemble=self_ensemble)
        with tracked(params, "score") as tracking:
            tracking.log_metrics({f"seconds_per_image.{name}": v for name, v in seconds.items()})
            tracking.log_metrics(flat_scores(metrics))
            tracking.log_metrics(flat_scores(metrics), parent=True)  # the pipeline's row in `mlflow ui`
            for path in files:
                tracking.log_artifact(path)
            tracking.log_artifact(out_dir / layout.METRICS)  # whole, nested: `srmodels summarize` reads the costs
            for path in panels:
                tracking.log_artifact(path, f"panels/{path.parent.name}")
    record(params, "score", {"seconds_per_image": seconds})


if __name__ == "__main__":
    run("score", main)
