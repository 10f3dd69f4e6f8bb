"""Run a backbone once over every image later stages need and store its outputs (srmodels.data.member_outputs'
format): the cache stage's work. No stage after it runs a backbone."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from srmodels.core import layout
from srmodels.data.images import image_size, list_images, read_image, to_tensor
from srmodels.data.member_outputs import save_output
from srmodels.models.inference import upscale
from srmodels.models.model import check_input_size, min_input_size

log = logging.getLogger(__name__)


def cache_outputs(model: torch.nn.Module, prepared: Path, out_dir: Path, *, scale: int, self_ensemble: bool,
                  tile: int | None, tile_overlap: int, device: torch.device,
                  seconds: dict[str, list[float]] | None = None) -> dict[str, int]:
    """Upscale fusion_train, val and every eval set; returns how many images each output folder got.

    ``seconds``, when given, collects each image's forward time under 'plain' or 'x8' (for the run record)."""
    # out_dir is one member's cache folder: the paths below are layout.cached_* with the member's folder as root.
    root, member = out_dir.parent, out_dir.name
    jobs: list[tuple[Path, Path, bool]] = [
        (layout.fusion_train(prepared).lr, layout.cached_fusion_train(root, member), False),
        (layout.val(prepared).lr, layout.cached_val(root, member, False), False)]
    if self_ensemble:
        jobs.append((layout.val(prepared).lr, layout.cached_val(root, member, True), True))
    for set_name in layout.eval_sets(prepared):
        for ensemble in (False, True) if self_ensemble else (False,):
            jobs.append((layout.eval_set(prepared, set_name).lr, layout.cached_eval(root, member, set_name, ensemble),
                         ensemble))
    if min_input_size(model) > 1:
        # Every input checked before the first forward: one too small near the end would otherwise fail the
        # stage after all the work before it, with the architecture's traceback.
        for lr_dir in dict.fromkeys(lr_dir for lr_dir, _, _ in jobs):
            for path in list_images(lr_dir):
                check_input_size(model, *image_size(path), path)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # stale outputs of removed images must not survive
    counts: dict[str, int] = {}
    model = model.to(device).eval()
    with torch.inference_mode():
        for lr_dir, dst, ensemble in jobs:
            files = list_images(lr_dir)
            for path in tqdm(files, desc=str(dst.relative_to(out_dir)), leave=False):
                lr = read_image(path)
                check_input_size(model, lr.shape[0], lr.shape[1], path)
                x = to_tensor(lr).to(device)
                start = time.perf_counter()
                sr = upscale(model, x, scale, self_ensemble=ensemble, tile=tile, tile_overlap=tile_overlap)
                if seconds is not None:
                    seconds.setdefault("x8" if ensemble else "plain", []).append(time.perf_counter() - start)
                save_output(dst / f"{path.stem}.npy", sr)
            counts[str(dst.relative_to(out_dir))] = len(files)
            log.info("%s: %d images", dst, len(files))
    return counts
