"""Stage `score`: PSNR/SSIM (Y, NTIRE protocol; and RGB) of bicubic, every member (plain and x8) and the fusion."""
from _common import setup

import csv
import json
from pathlib import Path

from srmodels.evaluation import score_eval_sets
from srmodels.report import bar_chart_png, curves_png, markdown_table, write_csv
from srmodels.tracking import start_stage

params = setup("score")
paths, members, mp = params["paths"], params["fusion"]["members"], params["metrics"]
out_dir = Path(paths["score"])
summary, rows = score_eval_sets(members, Path(paths["cache"]), Path(paths["prepared"]), Path(paths["test"]),
                                scale=params["scale"], crop_border=mp["crop_border"],
                                self_ensemble=params["inference"]["self_ensemble"])


def read_curve(path: Path, column: str) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r[column])) for r in csv.DictReader(f) if r[column] not in ("", "nan")]


finetune = {m: json.loads((Path(paths["finetune"]) / m / "metrics.json").read_text()) for m in members}
fusion = json.loads((Path(paths["fusion"]) / "metrics.json").read_text())
metrics = {
    "protocol": {"crop_border": mp["crop_border"], "primary": "y" if mp["y_channel"] else "rgb",
                 "self_ensemble": params["inference"]["self_ensemble"]},
    "sets": summary,
    "val": {"fusion_psnr_y": fusion["best_val_psnr"], **{f"{m}_psnr_y": finetune[m]["best_val_psnr"] for m in members}},
}
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
write_csv(out_dir / "per_image.csv", rows)
table_rows = [{"set": s, "model": m, **v} for s, d in summary.items() for m, v in d.items() if isinstance(v, dict)]
(out_dir / "table.md").write_text(markdown_table(table_rows))
plots = out_dir / "plots"
plots.mkdir(exist_ok=True)
key = "psnr_y" if mp["y_channel"] else "psnr_rgb"
scored = [s for s, v in summary.items() if v.get("scored", True)]
first = scored[0] if scored else None
if first:
    bar_chart_png(plots / "psnr_bar.png", {m: v[key] for m, v in summary[first].items() if isinstance(v, dict)},
                  title=f"{first}: {key.replace('_', '-').upper()} (crop {mp['crop_border']})")
curves = {m: read_curve(Path(paths["finetune"]) / m / "curve.csv", "val_psnr") for m in members}
curves["fusion"] = read_curve(Path(paths["fusion"]) / "curve.csv", "val_psnr")
curves_png(plots / "curves.png", curves, ylabel="validation PSNR-Y (dB)", title="training curves")

with start_stage(params, "score") as run:
    final = {f"{s}.{m}.{k}": v for s in scored for m, d in summary[s].items() if isinstance(d, dict)
             for k, v in d.items()}
    final.update({f"val.{k}": v for k, v in metrics["val"].items()})
    run.log_metrics(final)
    run.log_parent_metrics(final)
    for path in [out_dir / "table.md", out_dir / "per_image.csv", *sorted(plots.glob("*.png"))]:
        run.log_artifact(path)
