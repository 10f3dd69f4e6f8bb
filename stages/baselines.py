"""Stage `baselines`: what the fusion's training-free rivals need, from the members' cached outputs alone.

The validation-best member (what selection alone gives, and the reference every fusion is compared with), the
global least-squares weights (one per member, closed form, fitted on the fusion-training split) and each
member's size and multiply-accumulates per output pixel. The score stage applies them, and the oracles, to
every scored set. Kept apart from the fusion stage, so that changing how the fusion net learns (``fusion.*``
other than the members) re-fits nothing here.
"""
from stages._common import record, run, tracked  # first: pins the CPU kernels before torch loads

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srmodels.core import layout
from srmodels.models.costs import macs_per_output_pixel, num_params
from srmodels.data.datasets import fusion_images, load_fusion_image
from srmodels.evaluation.ensembles import NormalEquations
from srmodels.data.images import to_uint8
from srmodels.metrics.psnr_ssim import calculate_psnr
from srmodels.models.model import build_model
from srmodels.core.files import staged, write_json
from srmodels.core.runtime import set_threads

log = logging.getLogger(__name__)


def _split(items: list, members: list[str]) -> Any:
    """(name, members (N, 3, H, W), HR uint8 HxWx3) of each image."""
    for item in items:
        cands, _, hr = load_fusion_image(item, layout.SCALE)
        yield item.stem, cands.view(len(members), 3, *cands.shape[-2:]), hr


def member_val_psnr(items: list, members: list[str], crop_border: int) -> dict[str, float]:
    """Each member's mean validation PSNR-Y (8-bit outputs, contiguous as ``training.evaluate`` scores them: the
    metric rounds differently on a strided view), so the best member is the one the fusion stage chooses."""
    scores: dict[str, list[float]] = {m: [] for m in members}
    for _, cands, hr in _split(items, members):
        for i, m in enumerate(members):
            sr = np.ascontiguousarray(to_uint8(cands[i]))
            scores[m].append(calculate_psnr(sr, hr, crop_border=crop_border, y_channel=True))
    return {m: sum(v) / len(v) for m, v in scores.items()}


def least_squares(items: list, members: list[str], crop_border: int) -> dict[str, Any]:
    """Global least-squares weights over every pixel and RGB channel of the fusion-training images."""
    equations = NormalEquations(crop_border=crop_border)
    for _, cands, hr in tqdm(list(_split(items, members)), desc="least squares", leave=False):
        equations.add(cands, torch.from_numpy(hr).permute(2, 0, 1).double() / 255.0)
    weights = equations.solve()
    return {"weights": dict(zip(members, (float(w) for w in weights))), "train_rmse": equations.mse(weights) ** 0.5}


def main(params: dict[str, Any]) -> None:
    paths, members = params["paths"], params["fusion"]["members"]
    self_ensemble, crop = params["inference"]["self_ensemble"], params["metrics"]["crop_border"]
    prepared, cache = Path(paths["prepared"]), Path(paths["cache"])
    set_threads(params["threads"])

    val = layout.val(prepared)
    val_items = fusion_images([layout.cached_val(cache, m, self_ensemble) for m in members], val.hr, val.lr,
                              layout.SCALE)
    val_psnr = member_val_psnr(val_items, members, crop)
    best = max(members, key=val_psnr.__getitem__)  # the first of equals, as the fusion stage chooses
    train = layout.fusion_train(prepared)
    train_items = fusion_images([layout.cached_fusion_train(cache, m) for m in members], train.hr, train.lr,
                                layout.SCALE)
    lsq = least_squares(train_items, members, crop)
    log.info("best validation member %s (%.4f dB); least-squares weights %s", best, val_psnr[best],
             ", ".join(f"{m} {w:+.4f}" for m, w in lsq["weights"].items()))
    costs = {}
    for m in members:
        model = build_model(params["backbones"][m]["variant"])
        costs[m] = {"variant": params["backbones"][m]["variant"], "params": num_params(model),
                    "macs_per_pixel": macs_per_output_pixel(model, scale=layout.SCALE),
                    "macs_per_pixel_se": macs_per_output_pixel(model, scale=layout.SCALE, self_ensemble=True)}
    with staged(Path(paths["baselines"]), paths["work"]) as out_dir:
        write_json(out_dir / layout.BASELINES, {
            "members": members, "self_ensemble": self_ensemble, "crop_border": crop,
            "best_member": best, "member_val_psnr": val_psnr,
            "least_squares": {**lsq, "fitted_on": "fusion_train, plain outputs (the x8 outputs are not cached "
                                                  "there; the fusion net learns from the same)",
                              "form": "sum_i w_i * c_i, unconstrained, every RGB value of every image"},
            "costs": {**costs, "measured_at": "LR 64x64, MACs / output pixel (torch's FLOP counter / 2)"}})
        with tracked(params, "baselines") as tracking:
            tracking.log_metrics({**{f"val.{m}_psnr_y": v for m, v in val_psnr.items()},
                                  **{f"lsq.weight.{m}": w for m, w in lsq["weights"].items()},
                                  "lsq.train_rmse": lsq["train_rmse"]})
    record(params, "baselines")


if __name__ == "__main__":
    run("baselines", main)
