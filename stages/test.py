"""Stage `test`: fuse the cached outputs of every scored set; write SR PNGs and per-pixel weight pictures."""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

import time
from pathlib import Path
from typing import Any

from srmodels.core import layout
from srmodels.core.errors import UserError
from srmodels.evaluation.evaluation import fuse_eval_sets
from srmodels.models.fusion import fusion_kind, load_fusion
from srmodels.core.files import staged, write_json
from srmodels.core.runtime import resolve_device, set_threads


def main(params: dict[str, Any]) -> None:
    paths = params["paths"]
    ckpt_path = Path(paths["fusion"]) / layout.BEST
    net, meta = load_fusion(ckpt_path)
    members, kind = meta.get("members"), fusion_kind(meta)
    if members != params["fusion"]["members"]:
        raise UserError(f"fusion.members: {ckpt_path} fuses {members}, params say {params['fusion']['members']} "
                        "(re-run the fusion stage)")
    set_threads(params["threads"])
    with staged(Path(paths["test"]), paths["work"], whole=True) as out_dir:
        start = time.perf_counter()
        counts = fuse_eval_sets(net, kind, members, Path(paths["cache"]), Path(paths["prepared"]), out_dir,
                                self_ensemble=params["inference"]["self_ensemble"],
                                device=resolve_device(params["device"]))
        # Reading the cached members, the weight net, the fused sum and writing the PNGs, per image.
        timing = {"seconds_per_image.fusion": (time.perf_counter() - start) / max(sum(counts.values()), 1)}
        write_json(out_dir / layout.COUNTS, counts)
        with tracked(params, "test") as tracking:
            tracking.log_metrics({f"num_images.{k}": v for k, v in counts.items()})
            tracking.log_metrics(timing)
            for set_name in counts:
                for picture in sorted((out_dir / layout.WEIGHTS / set_name).glob("*.png"))[:8]:
                    tracking.log_artifact(picture, f"weights/{set_name}")
    record(params, "test", timing)


if __name__ == "__main__":
    run("test", main)
