"""Stage `score`: PSNR/SSIM (Y, NTIRE protocol; and RGB) of bicubic, every member (plain and x8) and the fusion."""
from _common import record, run, tracked  # first: pins the CPU kernels before torch loads

import csv
import json
from pathlib import Path
from typing import Any

from srmodels.evaluation import score_eval_sets
from srmodels.outputs import staged, write_json
from srmodels.report import bar_chart_png, curves_png, markdown_table, write_csv


def read_curve(path: Path, column: str) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r[column])) for r in csv.DictReader(f) if r[column] not in ("", "nan")]


def main(params: dict[str, Any]) -> None:
    paths, members, mp = params["paths"], params["fusion"]["members"], params["metrics"]
    summary, rows = score_eval_sets(members, Path(paths["cache"]), Path(paths["prepared"]), Path(paths["test"]),
                                    scale=params["scale"], crop_border=mp["crop_border"],
                                    self_ensemble=params["inference"]["self_ensemble"])
    finetune = {m: json.loads((Path(paths["finetune"]) / m / "metrics.json").read_text()) for m in members}
    fusion = json.loads((Path(paths["fusion"]) / "metrics.json").read_text())
    metrics = {
        "cpu_isa": params["cpu_isa"],
        "protocol": {"crop_border": mp["crop_border"], "primary": "y" if mp["y_channel"] else "rgb",
                     "self_ensemble": params["inference"]["self_ensemble"]},
        "sets": summary,
        "val": {"fusion_psnr_y": fusion["best_val_psnr"],
                **{f"{m}_psnr_y": finetune[m]["best_val_psnr"] for m in members}},
    }
    key = "psnr_y" if mp["y_channel"] else "psnr_rgb"
    scored = [s for s, v in summary.items() if v.get("scored", True)]
    with staged(Path(paths["score"]), paths["work"]) as out_dir:
        write_json(out_dir / "metrics.json", metrics)
        write_csv(out_dir / "per_image.csv", rows)
        table_rows = [{"set": s, "model": m, **v} for s, d in summary.items() for m, v in d.items()
                      if isinstance(v, dict)]
        (out_dir / "table.md").write_text(markdown_table(table_rows))
        plots = out_dir / "plots"
        plots.mkdir()
        if scored:
            first = scored[0]
            bar_chart_png(plots / "psnr_bar.png",
                          {m: v[key] for m, v in summary[first].items() if isinstance(v, dict)},
                          title=f"{first}: {key.replace('_', '-').upper()} (crop {mp['crop_border']})")
        curves = {m: read_curve(Path(paths["finetune"]) / m / "curve.csv", "val_psnr") for m in members}
        curves["fusion"] = read_curve(Path(paths["fusion"]) / "curve.csv", "val_psnr")
        curves_png(plots / "curves.png", curves, ylabel="validation PSNR-Y (dB)", title="training curves")

        with tracked(params, "score") as tracking:
            final = {f"{s}.{m}.{k}": v for s in scored for m, d in summary[s].items() if isinstance(d, dict)
                     for k, v in d.items()}
            final.update({f"val.{k}": v for k, v in metrics["val"].items()})
            tracking.log_metrics(final)
            tracking.log_parent_metrics(final)
            for path in [out_dir / "table.md", out_dir / "per_image.csv", *sorted(plots.glob("*.png"))]:
                tracking.log_artifact(path)
    record(params, "score")


if __name__ == "__main__":
    run("score", main)
