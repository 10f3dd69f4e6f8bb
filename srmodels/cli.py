"""The ``srmodels`` command: eval, upscale, downscale (and bench).

Input problems end in one line naming the file and the problem, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .bench import (DEFAULT_VARIANTS, NTIRE_FUSION_SAMPLES, bench_fusion_train, bench_one, format_table,
                    format_train_table)
from .checkpoint import CheckpointError
from .images import ImageError, check_pair, list_images, pair_by_stem, read_image, to_tensor, to_uint8, write_image
from .imresize import downscale_uint8
from .inference import upscale
from .metrics import calculate_psnr, calculate_ssim
from .model import load_model
from .runtime import keep_freed_memory, resolve_device

log = logging.getLogger("srmodels")


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except RuntimeError as err:  # a one-line CLI error, not a traceback
        raise SystemExit(f"srmodels: error: --device {name}: {err}") from None


def _inputs(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(list_images(p))
        elif p.exists():
            files.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    if not files:
        raise ImageError(f"no images found in {', '.join(paths)}")
    return files


def _sr(model, lr: np.ndarray, args, device: torch.device) -> np.ndarray:
    x = to_tensor(lr).to(device)
    # bf16 autocast is what training and caching use on CUDA; on CPU it is slow but checks the numerics.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        y = upscale(model, x, model.scale, self_ensemble=args.self_ensemble, tile=args.tile,
                    tile_overlap=args.tile_overlap)
    return to_uint8(y.float())


def cmd_eval(args) -> int:
    device = _device(args.device)
    model = load_model(args.weights, args.arch).to(device)
    scale = args.scale
    if model.scale != scale:
        raise CheckpointError(f"{args.weights}: the model upscales x{model.scale}, but --scale {scale}")
    hr_files = list_images(args.hr)
    if not hr_files:
        raise ImageError(f"{args.hr}: no images")
    pairs = pair_by_stem(hr_files, list_images(args.lr), scale) if args.lr else [(p, None) for p in hr_files]
    rows = []
    for hr_path, lr_path in pairs:
        hr = read_image(hr_path)
        if lr_path is None:
            hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
            lr = downscale_uint8(hr, scale)
        else:
            lr = read_image(lr_path)
            hr = check_pair(hr, lr, scale, hr_path, lr_path)
        sr = _sr(model, lr, args, device)
        psnr = calculate_psnr(sr, hr, crop_border=args.crop_border, y_channel=args.y_channel)
        ssim = calculate_ssim(sr, hr, crop_border=args.crop_border, y_channel=args.y_channel)
        rows.append({"image": hr_path.stem, "psnr": round(float(psnr), 4), "ssim": round(float(ssim), 5)})
        print(f"{hr_path.stem:<24} {psnr:8.4f} dB  {ssim:.5f}")
    result = {
        "images": rows,
        "mean_psnr": round(float(np.mean([r["psnr"] for r in rows])), 4),
        "mean_ssim": round(float(np.mean([r["ssim"] for r in rows])), 5),
        "protocol": {"scale": scale, "crop_border": args.crop_border,
                     "channel": "y" if args.y_channel else "rgb", "self_ensemble": args.self_ensemble,
                     "tile": args.tile, "tile_overlap": args.tile_overlap, "bf16": args.bf16,
                     "lr": "given" if args.lr else "matlab bicubic of HR"},
    }
    print(f"{'mean':<24} {result['mean_psnr']:8.4f} dB  {result['mean_ssim']:.5f}  "
          f"({'Y' if args.y_channel else 'RGB'}, crop {args.crop_border}, {len(rows)} images)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_upscale(args) -> int:
    device = _device(args.device)
    model = load_model(args.weights, args.arch).to(device)
    out = Path(args.output)
    for path in _inputs(args.inputs):
        sr = _sr(model, read_image(path), args, device)
        stem = path.stem
        target = out / f"{stem[:-2] if stem.lower().endswith(f'x{model.scale}') else stem}.png"
        write_image(target, sr)
        log.info("%s -> %s", path, target)
    return 0


def cmd_downscale(args) -> int:
    out = Path(args.output)
    for path in list_images(args.hr):
        hr = read_image(path)
        hr = hr[: hr.shape[0] // args.scale * args.scale, : hr.shape[1] // args.scale * args.scale]
        write_image(out / f"{path.stem}x{args.scale}.png", downscale_uint8(hr, args.scale))
    return 0


def cmd_bench(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and not args.cpu_only else [])

    def dtypes(device: torch.device) -> list[torch.dtype]:  # bf16 is the CUDA path's autocast dtype
        return [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])

    rows = []
    for device in devices:
        for size in args.sizes:
            w, h = (int(v) for v in size.lower().split("x"))
            for name in args.models:
                for dtype in dtypes(device):
                    # the fusion net fuses self-ensembled candidates; it has no x8 of its own
                    for se in ([False, True] if args.self_ensemble and name != "fusion" else [False]):
                        rows.append(bench_one(name, h, w, device=device, dtype=dtype, self_ensemble=se,
                                              runs=args.runs, warmup=args.warmup))
                        log.info("%s", rows[-1])
    train_rows = []
    if args.fusion_train:
        batch, lr_patch = (int(v) for v in args.fusion_train.split(":"))
        for device in devices:
            for dtype in dtypes(device):
                train_rows.append(bench_fusion_train(batch, lr_patch, device=device, dtype=dtype, runs=args.runs,
                                                     warmup=args.warmup))
                log.info("%s", train_rows[-1])
    if rows:
        print(format_table(rows))
    if train_rows:
        print(format_train_table(train_rows))
        print(f"NTIRE min: {NTIRE_FUSION_SAMPLES:,} samples (150 epochs x 800 images) at the measured samples/s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"forward": rows, "fusion_train": train_rows}, indent=1) + "\n")
    return 0


def _numeric_leaves(obj, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        out: dict[str, float] = {}
        for k, v in obj.items():
            out.update(_numeric_leaves(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix[:-1]: float(obj)}
    return {}


def compare_metrics(old: dict, new: dict, tol_db: float, tol_ssim: float) -> list[str]:
    """Lines naming every PSNR/SSIM that moved past its tolerance, appeared or disappeared."""
    a, b = _numeric_leaves(old), _numeric_leaves(new)
    problems = []
    for key in sorted(set(a) | set(b)):
        leaf = key.rsplit(".", 1)[-1].lower()
        tol = tol_ssim if "ssim" in leaf else tol_db if "psnr" in leaf else None
        if tol is None:
            continue
        if key not in a or key not in b:
            problems.append(f"{key}: only in {'committed' if key in a else 'new'} metrics")
        elif abs(a[key] - b[key]) > tol:
            problems.append(f"{key}: {a[key]:.4f} -> {b[key]:.4f} (moved {b[key] - a[key]:+.4f}, tolerance {tol})")
    return problems


def cmd_compare_metrics(args) -> int:
    old, new = (json.loads(Path(p).read_text()) for p in (args.committed, args.new))
    problems = compare_metrics(old, new, args.tol_db, args.tol_ssim)
    for line in problems:
        print(f"MOVED {line}")
    n = sum(1 for k in _numeric_leaves(old) if "psnr" in k.lower() or "ssim" in k.lower())
    print(f"compare-metrics: {n} metrics compared, {len(problems)} moved past tolerance")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srmodels", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", required=True, help="checkpoint (ours, or released weights)")
        p.add_argument("--arch", help="variant name for released weights (ours describe themselves)")
        p.add_argument("--self-ensemble", action="store_true", help="x8 flips/rotations, averaged")
        p.add_argument("--tile", type=int, default=None, help="tile size in LR pixels (bounds memory)")
        p.add_argument("--tile-overlap", type=int, default=16, help="tile overlap in LR pixels")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")

    p = sub.add_parser("eval", help="PSNR/SSIM of a model on a folder of HR images")
    model_args(p)
    p.add_argument("--hr", required=True, help="folder of HR images")
    p.add_argument("--lr", help="folder of LR images (bird <-> birdx4); default: MATLAB bicubic of HR")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--crop-border", type=int, default=4)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--y-channel", dest="y_channel", action="store_true", default=True, help="score on Y (default)")
    g.add_argument("--rgb", dest="y_channel", action="store_false", help="score on RGB")
    p.add_argument("--json", help="write per-image and mean results here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("upscale", help="super-resolve images")
    model_args(p)
    p.add_argument("inputs", nargs="+", help="images or folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("downscale", help="MATLAB-bicubic LR images ({stem}x4.png, the DIV2K naming)")
    p.add_argument("hr", help="folder of HR images")
    p.add_argument("output", help="output folder")
    p.add_argument("--scale", type=int, default=4)
    p.set_defaults(func=cmd_downscale)

    p = sub.add_parser("bench", help="median ms per forward of each model (CPU, and CUDA when present)")
    p.add_argument("--models", nargs="*", default=list(DEFAULT_VARIANTS), help="variants, or 'fusion' (none: skip)")
    p.add_argument("--sizes", nargs="+", default=["64x64", "120x84"], help="LR sizes WxH")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    p.add_argument("--self-ensemble", action="store_true", help="also time the x8 self-ensemble")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--fusion-train", metavar="BATCH:LR_PATCH",
                   help="also time fusion-net training steps, e.g. 72:128 (team 27's batch and patch)")
    p.add_argument("--json", help="write the rows here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare-metrics", help="fail when PSNR/SSIM metrics moved (CI re-validation)")
    p.add_argument("committed", help="metrics.json of the committed run")
    p.add_argument("new", help="metrics.json of the new run")
    p.add_argument("--tol-db", type=float, default=0.01)
    p.add_argument("--tol-ssim", type=float, default=0.001)
    p.set_defaults(func=cmd_compare_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    keep_freed_memory()
    try:
        with torch.inference_mode():
            return args.func(args)
    except (ImageError, CheckpointError) as err:
        print(f"srmodels: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
