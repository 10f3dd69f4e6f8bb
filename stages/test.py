"""Stage `test`: fuse the cached outputs of every scored set; write SR PNGs and per-pixel weight pictures."""
from _common import setup

import json
from pathlib import Path

from srmodels.checkpoint import checkpoint_meta, load_into, read_checkpoint, unwrap_state_dict
from srmodels.evaluation import fuse_eval_sets
from srmodels.fusion import FUSION_KINDS
from srmodels.runtime import resolve_device, set_threads
from srmodels.tracking import start_stage

params = setup("test")
paths = params["paths"]
ckpt_path = Path(paths["fusion"]) / "best.pth"
raw = read_checkpoint(ckpt_path)
meta = checkpoint_meta(raw)
members, kind = meta["members"], meta["kind"]
if members != params["fusion"]["members"]:
    raise SystemExit(f"test: {ckpt_path} fuses {members}, params say fusion.members={params['fusion']['members']}")
net = FUSION_KINDS[kind](**meta["kwargs"])
load_into(net, unwrap_state_dict(raw), source=str(ckpt_path))
set_threads(params["threads"])
out_dir = Path(paths["test"])
counts = fuse_eval_sets(net, kind, members, Path(paths["cache"]), Path(paths["prepared"]), out_dir,
                        self_ensemble=params["inference"]["self_ensemble"], device=resolve_device(params["device"]))
(out_dir / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
with start_stage(params, "test") as run:
    run.log_metrics({f"num_images.{k}": v for k, v in counts.items()})
    for set_name in counts:
        for picture in sorted((out_dir / "weights" / set_name).glob("*.png"))[:8]:
            run.log_artifact(picture, f"weights/{set_name}")
