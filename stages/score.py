"""Stage `score`: PSNR/SSIM (Y, NTIRE protocol; and RGB) of bicubic, every member (plain and x8) and the fusion."""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

from pathlib import Path
from typing import Any

from srmodels.evaluation import (flat_scores, score_eval_sets, score_metrics, set_comparisons, training_curves,
                                 write_panels, write_score_report)
from srmodels.layout import SCALE
from srmodels.outputs import staged


def main(params: dict[str, Any]) -> None:
    paths, members, mp = params["paths"], params["fusion"]["members"], params["metrics"]
    self_ensemble = params["inference"]["self_ensemble"]
    finetune_dir, fusion_dir = Path(paths["finetune"]), Path(paths["fusion"])
    summary, rows, psnr_y = score_eval_sets(members, Path(paths["cache"]), Path(paths["prepared"]),
                                            Path(paths["test"]), scale=SCALE, crop_border=mp["crop_border"],
                                            self_ensemble=self_ensemble)
    comparisons = set_comparisons(psnr_y, members, self_ensemble=self_ensemble, **mp["bootstrap"])
    metrics = score_metrics(summary, comparisons, finetune_dir, fusion_dir, members, crop_border=mp["crop_border"],
                            y_channel=mp["y_channel"], self_ensemble=self_ensemble, cpu_isa=params["cpu_isa"],
                            bootstrap_resamples=mp["bootstrap"]["resamples"])
    with staged(Path(paths["score"]), paths["work"]) as out_dir:
        files = write_score_report(out_dir, metrics, rows, training_curves(finetune_dir, fusion_dir, members))
        panels = write_panels(members, Path(paths["cache"]), Path(paths["prepared"]), Path(paths["test"]),
                              out_dir / "panels", scale=SCALE, self_ensemble=self_ensemble)
        with tracked(params, "score") as tracking:
            tracking.log_metrics(flat_scores(metrics))
            tracking.log_metrics(flat_scores(metrics), parent=True)  # the pipeline's row in `mlflow ui`
            for path in files:
                tracking.log_artifact(path)
            for path in panels:
                tracking.log_artifact(path, f"panels/{path.parent.name}")
    record(params, "score")


if __name__ == "__main__":
    run("score", main)
