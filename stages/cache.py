"""Stage `cache@<backbone>`: run the fine-tuned backbone once over every image later stages use."""
from _common import setup

import json
import sys
from pathlib import Path

import torch

from srmodels.cache import cache_outputs
from srmodels.model import load_model
from srmodels.runtime import resolve_device, set_threads

name = sys.argv[1]
params = setup(f"cache@{name}")
inf, paths = params["inference"], params["paths"]
set_threads(params["threads"])
device = resolve_device(params["device"])
model = load_model(Path(paths["finetune"]) / name / "best.pth")
if inf["compile"] and device.type == "cuda":
    model = torch.compile(model)
out_dir = Path(paths["cache"]) / name
counts = cache_outputs(model, Path(paths["prepared"]), out_dir, scale=params["scale"],
                       self_ensemble=inf["self_ensemble"], tile=inf["tile"], tile_overlap=inf["tile_overlap"],
                       device=device)
(out_dir / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
