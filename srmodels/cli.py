"""The ``srmodels`` command: eval, upscale, downscale, export, compare-metrics (and bench).

A problem the user can fix (a missing, corrupt or oversized image, LR/HR sizes that do not fit the scale, an
unknown ``--arch``, an unreadable or unsafe checkpoint, an output path that is a file) ends in one line
``srmodels: error: <file>: <problem>`` and exit code 2, never a traceback; ``--debug`` (or the environment
variable SRMODELS_DEBUG=1) shows the traceback instead.

Inputs are all-or-nothing: eval, upscale and downscale first read and check every input image (one at a time,
nothing kept), and stop at the first bad one, naming it, before any model is loaded or any output written. eval
and upscale then check ``--tile`` and every input's size against the smallest input the model processes
(``srmodels.models.model.min_input_size``) before its first forward, and check up front that their output folders can be
written. Their outputs appear all at once when every image is done: a failure leaves nothing new behind.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srmodels import archs
from srmodels.core import isa
from srmodels.models.accelerate import accelerate
from srmodels.interop.bench import (DEFAULT_VARIANTS, NTIRE_FUSION_SAMPLES, bench_fusion_train, bench_one, format_table,
                    format_train_table)
from srmodels.models.checkpoint import CheckpointError
from srmodels.models.ensemble import Ensemble, find_ensemble, load_ensemble
from srmodels.core.errors import UserError
from srmodels.evaluation.evaluation import BenchmarkSet, benchmark_set, check_benchmark_sets, score_benchmark_sets
from srmodels.interop.export import FORMATS, ONNX_OPSET, export_official, export_onnx, export_safetensors
from srmodels.interop.ntire import DEFAULT_NAME, DEFAULT_TEAM, export_ntire
from srmodels.data.images import ImageError, image_size, list_images, read_image, to_tensor, to_uint8, write_image
from srmodels.data.imresize import downscale_uint8
from srmodels.models.inference import upscale
from srmodels.models.model import check_input_size, load_model, min_input_size
from srmodels.core.files import atomic, check_output_file, check_writable, remove, swap_in, write_json
from srmodels.core.params import flatten
from srmodels.data.prepare import SET_NAME_RULE, plan_set, valid_set_name
from srmodels.evaluation.report import sets_table
from srmodels.core.runtime import keep_freed_memory, resolve_device

log = logging.getLogger("srmodels")

INPUT_POLICY = ("Every input image is read and checked before any model work or output, and against the model's "
                "smallest input (and --tile) before its first forward; the first bad one stops the command with "
                "its name, and nothing is written.")


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except RuntimeError as err:  # no CUDA: the user's choice of --device, not a bug
        raise UserError(f"--device {name}: {err}") from None


def _check_arch(arch: str | None) -> None:
    # Checked here because archs.variant_spec raises a KeyError, which is a traceback by the one-line rule.
    if arch is not None and arch not in archs.variants():
        raise UserError(f"--arch {arch}: unknown variant; valid: {', '.join(sorted(archs.variants()))}")


def _output_folder(path: str, what: str) -> Path:
    """An output folder that exists or can be made; a file in its place is a one-line error up front."""
    out = Path(path)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker == out:
        raise UserError(f"{out}: {what} must be a folder, but it is an existing file")
    if blocker is not None:
        raise UserError(f"{blocker}: is a file, so the {what} folder {out} cannot be made under it")
    return out


def _remove_made(folders: Iterable[Path]) -> None:
    """Remove the folders a failed command made, deepest first, where they are still empty."""
    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _write_texts(texts: list[tuple[str, str, str]]) -> None:
    """Write each (path, text, what), all or none: every text to a temporary file beside its path first
    (:func:`srmodels.core.files.atomic`), then each renamed into place. On failure the temporary files and the
    folders made for them are removed."""
    made: list[Path] = []
    try:
        with contextlib.ExitStack() as renames:  # on leaving: every rename, or every temporary file removed
            for path, text, what in texts:
                target = Path(path)
                made += [p for p in target.parents if not p.exists()]
                try:
                    renames.enter_context(atomic(target)).write_text(text)
                except OSError as err:
                    raise UserError(f"{target}: cannot write the {what} ({err.strerror or err})") from None
    except BaseException:
        _remove_made(made)
        raise


@contextlib.contextmanager
def _all_at_once(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out`` whose files appear in ``out`` only when the block succeeds, each replacing
    the file of its name (renames only, rolled back if one fails: ``outputs.swap_in``). On failure nothing new is
    left: the staging folder goes, and ``out`` too if this made it."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    tag = f".srmodels-{os.getpid()}"
    staging = out / f"{tag}.new"
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"{out}: cannot make the output folder ({err.strerror or err})") from None
    try:
        yield staging
        swap_in(staging, out, out / f"{tag}.old", sorted(os.listdir(staging)))
    except BaseException:
        remove(staging)
        _remove_made(made)
        raise
    remove(staging)


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


def _checked_size(path: Path, scale: int | None = None) -> tuple[int, int]:
    """(height, width) of an image, decoded in full so that a corrupt file stops the command before any work."""
    h, w = image_size(path)
    if scale is not None and (h < scale or w < scale):
        raise ImageError(f"{path}: {w}x{h} is smaller than the scale x{scale}")
    return h, w


def _check_model_args(args) -> None:
    # inference.upscale raises a bare ValueError for these, which would be a traceback.
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile {args.tile}: must be >= 1 (LR pixels)")
    if args.tile_overlap < 0:
        raise UserError(f"--tile-overlap {args.tile_overlap}: must be >= 0")


def _check_model_limits(model, args, inputs: Iterable[tuple[str | Path, int, int]]) -> None:
    """``--tile`` and every LR input, as (name, height, width), against the smallest input ``model`` processes:
    checked before the first forward, which would fail only at that input, after the work before it."""
    smallest = min_input_size(model)
    if smallest <= 1:
        return
    window = None if args.tile is None else args.tile + 2 * args.tile_overlap
    # A tiled image is run in windows of tile + 2 x overlap (clipped to the image, which is checked below), so
    # a window under the limit fails on every image large enough to be tiled at all.
    if window is not None and window < smallest:
        raise UserError(f"--tile {args.tile}: with --tile-overlap {args.tile_overlap} each tile's LR window is "
                        f"{window}x{window} (tile + 2 x overlap), but {model.variant or model.arch} "
                        f"needs at least {smallest} px on each side; use --tile {smallest - 2 * args.tile_overlap} "
                        f"or more")
    for name, h, w in inputs:
        check_input_size(model, h, w, name)


def _sr(model, lr: np.ndarray, args, device: torch.device, path: Path) -> np.ndarray:
    if isinstance(model, Ensemble):  # its own settings; its inputs were checked against every member
        return model.upscale_image(lr)
    x = to_tensor(lr).to(device)
    try:
        # bf16 autocast is what training and caching use on CUDA; on CPU it is slow but checks the numerics.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            y = upscale(model, x, model.scale, self_ensemble=args.self_ensemble, tile=args.tile,
                        tile_overlap=args.tile_overlap)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        # The architectures refuse inputs they cannot process (RFDN: sides under 15 px) with a ValueError.
        raise ImageError(f"{path}: {model.variant or model.arch} cannot process this {lr.shape[1]}x{lr.shape[0]} "
                         f"input ({' '.join(str(err).split())})") from err
    return to_uint8(y.float())


def _output_file(path: str | None, what: str) -> None:
    """An output file that can be written: checked up front, so that a bad path costs no model work."""
    if path is not None:
        check_output_file(path, what)


def _folder_set_name(hr_dir: Path) -> str:
    """The table header of an --hr folder: its name, or its parent's when it is an HR/ folder (Set5/HR -> Set5)."""
    real = hr_dir.resolve()
    return (real.parent.name if real.name.lower() == "hr" and real.parent.name else real.name) or str(hr_dir)


def _set_specs(args) -> list[tuple[str, str]]:
    """(name, folder) of each --set, in the order given; a malformed or repeated --set is one line."""
    if args.lr is not None:
        raise UserError(f"--lr {args.lr}: only with --hr (a --set folder's LR images are in "
                        f"DIR/LR_bicubic/X{args.scale}/)")
    specs: list[tuple[str, str]] = []
    for spec in args.sets:
        name, eq, folder = spec.partition("=")
        if not eq or not folder:
            raise UserError(f"--set {spec}: expected NAME=DIR, e.g. --set Set5=datasets/Set5")
        if not valid_set_name(name):
            raise UserError(f"--set {spec}: {name!r} is not usable as a set name ({SET_NAME_RULE})")
        if name in (n for n, _ in specs):
            raise UserError(f"--set {spec}: the set name {name} is given twice")
        specs.append((name, folder))
    return specs


def cmd_eval(args) -> int:
    _check_arch(args.arch)
    _check_model_args(args)
    scale, crop_border = args.scale, args.crop_border
    if scale < 1 or crop_border < 0:
        raise UserError(f"--scale {scale} / --crop-border {crop_border}: need scale >= 1 and crop border >= 0")
    _output_file(args.json, "--json results")
    _output_file(args.table, "--table")
    if args.json and args.table and Path(args.json).resolve() == Path(args.table).resolve():
        raise UserError(f"--json {args.json} / --table {args.table}: the same file; the table would replace the "
                        f"results")
    if args.hr is not None:  # the one-folder form: one set
        hr_dir, lr_dir = Path(args.hr), None if args.lr is None else Path(args.lr)
        sets = [BenchmarkSet(_folder_set_name(hr_dir), hr_dir, lr_dir,
                             plan_set(hr_dir, lr_dir, scale, what=f"--hr {args.hr}"))]
    else:
        sets = [benchmark_set(name, Path(folder), scale, what=f"--set {name}={folder}")
                for name, folder in _set_specs(args)]
    # The input policy: every image of every set decoded and checked before the model is built.
    sizes: list = []
    count = check_benchmark_sets(sets, scale=scale, crop_border=crop_border, sizes=sizes)
    log.info("checked %d image(s) in %d set(s)", count, len(sets))
    device = _device(args.device)
    # LR = mod-cropped HR / scale; one made from HR is named by its HR file
    model = _model(args, device, [(entry.lr_path or entry.origin, h // scale, w // scale)
                                  for entry, (h, w) in sizes], scale=scale)
    ensemble = model if isinstance(model, Ensemble) else None
    if ensemble is not None:
        label = args.label or f"fusion({'+'.join(ensemble.names)}){'+se' if ensemble.self_ensemble else ''}"
        described = {"arch": "ensemble", "variant": None, **ensemble.describe()}
    else:
        label = args.label or f"{model.variant or model.arch}{'+se' if args.self_ensemble else ''}"
        described = {"arch": model.arch, "variant": model.variant}
    scored = score_benchmark_sets(
        sets, lambda lr, entry: _sr(model, lr, args, device, entry.lr_path or Path(entry.origin)),
        scale=scale, crop_border=crop_border)
    x8 = ensemble.self_ensemble if ensemble is not None else args.self_ensemble
    channel = "y" if args.y_channel else "rgb"
    table = sets_table({label: {s: r["mean"] for s, r in scored.items()}},
                       {s: r["num_images"] for s, r in scored.items()},
                       psnr_key=f"psnr_{channel}", ssim_key=f"ssim_{channel}")
    made = [s for s, r in scored.items() if r["lr_folder"] is None]
    caption = (f"PSNR (dB) / SSIM on {channel.upper()}, x{scale}, {crop_border}-pixel "
               f"border cropped; (n) = images per set"
               + (f"; LR made from HR with the MATLAB bicubic: {', '.join(made)}" if made else "")
               + ("; x8 self-ensemble" if x8 else "") + ".\n")
    print(table + "\n" + caption, end="")
    result = {
        "model": {"label": label, "weights": args.weights, **described},
        "protocol": {"scale": scale, "crop_border": crop_border, "y_channel": args.y_channel, "self_ensemble": x8,
                     "tile": ensemble.tile if ensemble is not None else args.tile,
                     "tile_overlap": ensemble.tile_overlap if ensemble is not None else args.tile_overlap,
                     "bf16": args.bf16, "plain": args.plain, "table": f"psnr_{channel} / ssim_{channel}"},
        "sets": scored,
        "machine": isa.provenance(),  # the kernels' pin, CPU and library versions behind these numbers
    }
    # Not json_text's sorted keys: the sets stay in the order given, as in the table.
    _write_texts(([(args.json, json.dumps(result, indent=1) + "\n", "--json results")] if args.json else [])
                 + ([(args.table, table + "\n" + caption, "--table")] if args.table else []))
    return 0


def _model(args, device: torch.device, lr_sizes: list[tuple[str | Path, int, int]], scale: int | None = None):
    """The model ``--weights`` names, on ``device``: the trained ensemble, or one backbone on the CPU kernels
    (unless --plain). Checked before any forward: its scale against ``scale``, and every LR input (name, height,
    width) against the smallest it processes."""
    ensemble = _ensemble(args)
    model = ensemble.to(device) if ensemble is not None else accelerate(
        load_model(args.weights, args.arch).to(device), enabled=not args.plain)
    if scale is not None and model.scale != scale:
        raise CheckpointError(f"{args.weights}: the model upscales x{model.scale}, but --scale {scale}")
    if ensemble is not None:
        for name, h, w in lr_sizes:
            ensemble.check_input(h, w, name)
    else:
        _check_model_limits(model, args, lr_sizes)
    return model


def _ensemble(args) -> Ensemble | None:
    """The ensemble ``--weights`` names (an ensemble file, its folder, an MLflow model's folder, or a
    ``models:/`` URI of the MLflow store), or None for a single model's checkpoint. An ensemble runs with the
    settings it was trained and tested with."""
    if args.weights.startswith(("models:/", "runs:/")):  # a model of the MLflow store (MLFLOW_TRACKING_URI)
        return _registered_ensemble(args)
    file = find_ensemble(args.weights)
    if file is None:
        return None
    _check_ensemble_flags(args)
    return load_ensemble(file, accelerated=not args.plain)


def _registered_ensemble(args) -> Ensemble:
    import tempfile

    from srmodels.core.layout import tracking_uri
    from srmodels.tracking.registry import download_model

    _check_ensemble_flags(args)
    with tempfile.TemporaryDirectory() as tmp:  # the ensemble is read whole into memory
        folder = download_model(args.weights, tracking_uri({}), Path(tmp))
        file = find_ensemble(folder)
        if file is None:
            raise UserError(f"--weights {args.weights}: not an ensemble model of srmodels")
        return load_ensemble(file, accelerated=not args.plain)


def _check_ensemble_flags(args) -> None:
    own = [flag for flag, given in (("--arch", args.arch), ("--self-ensemble", args.self_ensemble),
                                    ("--tile", args.tile is not None), ("--bf16", args.bf16)) if given]
    if own:
        raise UserError(f"--weights {args.weights}: an ensemble runs with its own settings (x8, tiles, members' "
                        f"variants); drop {', '.join(own)}")


def cmd_upscale(args) -> int:
    _check_arch(args.arch)
    _check_model_args(args)
    out = _output_folder(args.output, "-o/--output")
    check_writable(out, "the -o/--output images")
    files = _inputs(args.inputs)
    # the input policy: all checked before the model is built
    sizes = [(path, *_checked_size(path)) for path in files]
    device = _device(args.device)
    model = _model(args, device, sizes)

    def target(path: Path) -> Path:
        stem = path.stem
        return out / f"{stem[:-2] if stem.lower().endswith(f'x{model.scale}') else stem}.png"

    seen: dict[Path, Path] = {}
    for path in files:  # two inputs with one output name would silently overwrite each other
        if target(path) in seen:
            raise ImageError(f"{path}: its output {target(path)} is also {seen[target(path)]}'s; rename one")
        seen[target(path)] = path
    with _all_at_once(out) as staging:
        for path in files:
            write_image(staging / target(path).name, _sr(model, read_image(path), args, device, path))
            log.info("%s -> %s", path, target(path))
    return 0


def cmd_downscale(args) -> int:
    if args.scale < 1:
        raise UserError(f"--scale {args.scale}: must be >= 1")
    out = _output_folder(args.output, "output")
    files = list_images(args.hr)
    if not files:
        raise ImageError(f"{args.hr}: no images")
    for path in files:  # the input policy: all checked before anything is written
        _checked_size(path, args.scale)
    for path in files:
        hr = read_image(path)
        hr = hr[: hr.shape[0] // args.scale * args.scale, : hr.shape[1] // args.scale * args.scale]
        write_image(out / f"{path.stem}x{args.scale}.png", downscale_uint8(hr, args.scale))
    return 0


def cmd_bench(args) -> int:
    unknown = [m for m in args.models if m != "fusion" and m not in archs.variants()]
    if unknown:
        raise UserError(f"--models {' '.join(unknown)}: unknown; valid: fusion, {', '.join(sorted(archs.variants()))}")
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
                    # the fusion net fuses self-ensembled members; it has no x8 of its own
                    for se in ([False, True] if args.self_ensemble and name != "fusion" else [False]):
                        rows.append(bench_one(name, h, w, device=device, dtype=dtype, self_ensemble=se,
                                              runs=args.runs, warmup=args.warmup, plain=args.plain))
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
        write_json(args.json, {"forward": rows, "fusion_train": train_rows})
    return 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricsDiff:
    """Every difference between two metrics documents, one printable line each."""

    def __init__(self, old: Any, new: Any, tol_db: float = 0.0, tol_ssim: float = 0.0) -> None:
        a, b = flatten(old, lists=True), flatten(new, lists=True)  # every leaf by dotted key
        self.compared = 0
        self.moved: list[str] = []      # numbers beyond their tolerance
        self.changed: list[str] = []    # other values (strings, booleans, null, a number that became a string)
        self.only: list[str] = []       # keys present in one document only
        for key in sorted(set(a) | set(b)):
            if key not in b or key not in a:
                side, value = ("old", a[key]) if key in a else ("new", b[key])
                self.only.append(f"ONLY IN {side.upper()} {key} = {value!r}")
                continue
            x, y = a[key], b[key]
            if _is_number(x) and _is_number(y):
                self.compared += 1
                leaf = key.rsplit(".", 1)[-1].lower()
                # A tolerance applies only to PSNR / SSIM keys; every other number must match exactly.
                tol = tol_ssim if "ssim" in leaf else tol_db if "psnr" in leaf else 0.0
                if math.isnan(x) and math.isnan(y):
                    continue
                diff = y - x
                if not abs(diff) <= tol:  # also true when one side is NaN
                    self.moved.append(f"MOVED {key}: {x!r} -> {y!r} (diff {diff:+}"
                                      + (f", tolerance {tol!r})" if tol else ")"))
            elif type(x) is not type(y) or x != y:
                self.changed.append(f"CHANGED {key}: {x!r} -> {y!r}")

    def lines(self) -> list[str]:
        return self.moved + self.changed + self.only

    def summary(self) -> str:
        text = f"compare-metrics: {self.compared} metrics compared, {len(self.moved)} moved"
        if self.changed:
            text += f", {len(self.changed)} other value{'s' if len(self.changed) != 1 else ''} changed"
        if self.only:
            text += f", {len(self.only)} only in one file"
        return text


def compare_metrics(old: Any, new: Any, tol_db: float = 0.0, tol_ssim: float = 0.0) -> list[str]:
    """Lines naming every metric that moved (beyond the PSNR / SSIM tolerance), changed, appeared or vanished."""
    return MetricsDiff(old, new, tol_db, tol_ssim).lines()


def _read_json(path: str) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: no such metrics file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: cannot read the metrics file ({err})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def cmd_compare_metrics(args) -> int:
    diff = MetricsDiff(_read_json(args.committed), _read_json(args.new), args.tol_db, args.tol_ssim)
    for line in diff.lines():
        print(line)
    print(diff.summary())
    return 1 if diff.lines() else 0


def cmd_profile(args) -> int:
    from srmodels.core.params import apply_profile, merged, profile_overrides, read_profile, read_yaml, validate

    profile = read_profile(args.name)
    if args.apply:
        apply_profile(args.params, profile)
        log.info("%s: profile %s applied", args.params, args.name)
    else:
        validate(merged(read_yaml(args.params), profile))  # refuse here rather than in a stage
        print(" ".join(profile_overrides(profile)))
    return 0


def cmd_check(args) -> int:
    from srmodels.core.params import check_params

    path = args.params or os.environ.get("SRMODELS_PARAMS") or "params.yaml"  # the file the stages read
    params = check_params(path)
    print(f"{path}: ok ({len(params['backbones'])} backbones; trained: {', '.join(params['trained'])}; "
          f"members: {', '.join(params['fusion']['members'])})")
    return 0


def cmd_summarize(args) -> int:
    from srmodels.evaluation import summarize

    if args.source == "mlflow":
        from srmodels.core.params import read_yaml
        from srmodels.tracking import finished_pipelines

        params_file = Path(args.repo) / "params.yaml"
        runs = summarize.mlflow_runs(finished_pipelines(read_yaml(params_file) if params_file.is_file() else {},
                                                        names=args.exp, root=Path(args.repo).resolve()))
    else:
        runs = summarize.dvc_runs(args.repo, args.exp, all_commits=args.all_commits)
    result = summarize.summarize(runs, set_name=args.set, resamples=args.resamples, seed=args.seed)
    files = summarize.write_summary(_output_folder(args.output, "--output"), result)
    print(summarize.markdown(result))
    log.info("wrote %s", ", ".join(str(f) for f in files))
    return 0


def _weights_option(args) -> None:
    """``--weights`` names the weights in every subcommand. ``export`` also takes them as its first argument,
    the older form, with a warning; naming them both ways, differently, is an error."""
    positional = getattr(args, "weights_positional", None)
    if positional is None:
        if args.weights is None:
            raise UserError("--weights: required (the checkpoint to use)")
        return
    if args.weights is not None and args.weights != positional:
        raise UserError(f"--weights {args.weights} and the argument {positional}: name the weights once")
    log.warning("`srmodels %s WEIGHTS` is deprecated; write `--weights %s`", args.command, positional)
    args.weights = positional


def cmd_export(args) -> int:
    _weights_option(args)
    _check_arch(args.arch)
    if args.to == "ntire":
        print(export_ntire(args.weights, args.output, team=args.team, name=args.team_name).summary())
        return 0
    if find_ensemble(args.weights) is not None:
        raise UserError(f"--weights {args.weights}: the trained ensemble exports --to ntire; export one member's "
                        f"checkpoint (data/finetune/<b>/best.pth) --to {args.to}")
    # torch.export traces with autograd's ordinary tensors; main() runs commands under inference_mode.
    with torch.inference_mode(False):
        if args.to == "onnx":
            check = export_onnx(args.weights, args.output, variant=args.arch, opset=args.opset)
            print(check.summary())
        elif args.to == "official":
            print(export_official(args.weights, args.output, variant=args.arch))
        else:
            print(export_safetensors(args.weights, args.output, variant=args.arch))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """What eval and upscale share: the model and how it runs."""
    p.add_argument("--weights", required=True,
                   help="checkpoint (ours, or released weights), or the trained ensemble (file or folder)")
    p.add_argument("--arch", help="variant name for released weights (ours describe themselves); one of "
                   + ", ".join(sorted(archs.variants())))
    p.add_argument("--self-ensemble", action="store_true", help="x8 flips/rotations, averaged")
    p.add_argument("--tile", type=int, default=None, help="tile size in LR pixels (bounds memory)")
    p.add_argument("--tile-overlap", type=int, default=16, help="tile overlap in LR pixels")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")
    p.add_argument("--plain", action="store_true",
                   help="run the plain port, without the CPU inference kernels of srmodels.models.accelerate")
    _cpu_isa_arg(p)


def _cpu_isa_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-isa", choices=isa.CHOICES, default=isa.NATIVE,
                   help="pin the CPU kernels' instruction set (avx2: the same bits on every x86-64 CPU, as "
                        "the pipeline runs; default native: this CPU's fastest kernels)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    sets = p.add_mutually_exclusive_group(required=True)
    sets.add_argument("--set", dest="sets", action="append", metavar="NAME=DIR",
                      help="a benchmark set (repeat for several): HR images in DIR/HR/ (or directly in DIR when it has "
                           "no HR/), LR in DIR/LR_bicubic/X4/ (bird <-> birdx4) or, without that folder, the MATLAB "
                           "bicubic of HR")
    sets.add_argument("--hr", help="one folder of HR images (a set named after the folder: Set5/HR -> Set5)")
    p.add_argument("--lr", help="with --hr: folder of LR images (bird <-> birdx4); default: MATLAB bicubic of HR")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--crop-border", type=int, default=4)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--y-channel", dest="y_channel", action="store_true", default=True,
                   help="table on Y (default)")
    g.add_argument("--rgb", dest="y_channel", action="store_false", help="table on RGB (the JSON has both)")
    p.add_argument("--label", help="the model's row in the table (default: its variant, +se with --self-ensemble)")
    p.add_argument("--json", help="write per-set means, per-image scores and the protocol here")
    p.add_argument("--table", help="also write the Markdown table here")


def _upscale_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("inputs", nargs="+", help="images or folders")
    p.add_argument("-o", "--output", required=True, help="output folder (made if absent; not a file)")


def _downscale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hr", help="folder of HR images")
    p.add_argument("output", help="output folder")
    p.add_argument("--scale", type=int, default=4)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="*", default=list(DEFAULT_VARIANTS), help="variants, or 'fusion' (none: skip)")
    p.add_argument("--sizes", nargs="+", default=["64x64", "120x84"], help="LR sizes WxH")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    p.add_argument("--self-ensemble", action="store_true", help="also time the x8 self-ensemble")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--plain", action="store_true",
                   help="time the plain port only (default: the accelerated model, the plain port and their ratio)")
    p.add_argument("--fusion-train", metavar="BATCH:LR_PATCH",
                   help="also time fusion-net training steps, e.g. 72:128 (team 27's batch and patch)")
    p.add_argument("--json", help="write the rows here")
    _cpu_isa_arg(p)


def _compare_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("committed", help="metrics.json of the committed run")
    p.add_argument("new", help="metrics.json of the new run")
    p.add_argument("--tol-db", type=float, default=0.0, help="allowed |change| of keys named *psnr* (default: exact)")
    p.add_argument("--tol-ssim", type=float, default=0.0, help="allowed |change| of keys named *ssim* (default: exact)")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a profile name in profiles/ (e.g. ntire) or a YAML file")
    p.add_argument("--apply", action="store_true", help="write the profile into the params file instead")
    p.add_argument("--params", default="params.yaml", help="the params file it applies to (default params.yaml)")


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("params", nargs="?", default=None,
                   help="the params file (default: $SRMODELS_PARAMS, else params.yaml, as the stages read it)")


def _summarize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", choices=["dvc", "mlflow"], default="dvc",
                   help="where the runs are read: DVC experiments (default) or the MLflow store of params.yaml")
    p.add_argument("--repo", default=".", help="the repository (default: here)")
    p.add_argument("--exp", action="append", metavar="NAME",
                   help="only this experiment (repeatable; default: every finished one)")
    p.add_argument("--all-commits", action="store_true", help="DVC: experiments of every baseline commit, not HEAD's")
    p.add_argument("--set", default="test", help="the scored set to summarise (default: test)")
    p.add_argument("-o", "--output", default="summary", help="output folder (default: summary)")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="checkpoint to export (required)")
    p.add_argument("weights_positional", nargs="?", metavar="WEIGHTS", help="deprecated: use --weights")
    p.add_argument("--to", required=True, choices=(*FORMATS, "ntire"), help="output format")
    p.add_argument("-o", "--output", required=True,
                   help="file to write (ntire: the folder that gets models/ and model_zoo/)")
    p.add_argument("--team", type=int, default=DEFAULT_TEAM, help=f"ntire: team number (default {DEFAULT_TEAM})")
    p.add_argument("--team-name", default=DEFAULT_NAME, help=f"ntire: team name (default {DEFAULT_NAME})")
    p.add_argument("--arch", help="variant name for released weights (ours describe themselves)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (>= 17; default {ONNX_OPSET})")


# Each subcommand: its name, what ``add_parser`` takes (help, description, epilog), the function adding its
# arguments and the one running it.
_COMMANDS: tuple[tuple[str, dict[str, str], Callable[[argparse.ArgumentParser], None], Callable[..., int]], ...] = (
    ("eval", dict(
        help="PSNR/SSIM of a model on benchmark sets, as one table", epilog=INPUT_POLICY,
        description="Score a model on one or more benchmark sets and print one Markdown table in the layout of SR "
                    "papers: a column per set (in the order given), cells PSNR / SSIM on Y with the crop border. "
                    "--json writes per-set means and per-image PSNR/SSIM on Y and RGB."), _eval_args, cmd_eval),
    ("upscale", dict(
        help="super-resolve images with a model or the trained ensemble", epilog=INPUT_POLICY,
        description="Upscale images x4 with one model's checkpoint, or with the trained ensemble (--weights "
                    "data/ensemble/ensemble.safetensors, its folder, or an MLflow model's folder): its members, "
                    "fusion net, x8 and tiling as the pipeline ran them; with --cpu-isa avx2 (the pipeline's pin) "
                    "its PNGs are the test stage's, bit for bit."), _upscale_args, cmd_upscale),
    ("downscale", dict(help="MATLAB-bicubic LR images ({stem}x4.png, the DIV2K naming)", epilog=INPUT_POLICY),
     _downscale_args, cmd_downscale),
    ("bench", dict(help="median ms per forward of each model (CPU, and CUDA when present)"), _bench_args, cmd_bench),
    ("compare-metrics", dict(
        help="fail when any metric moved (CI re-validation)",
        description="Compare every leaf of two metrics JSON files. Prints one line per number that moved (dotted "
                    "key, old and new in full precision, the difference), per other value that changed and per "
                    "key found in one file only, then a summary; exit 1 if anything differs."),
     _compare_metrics_args, cmd_compare_metrics),
    ("profile", dict(
        help="a params profile (profiles/<name>.yaml) as `dvc exp run` overrides, or written in",
        description="Print the `-S ++key=value` overrides that apply a profile, for "
                    "`dvc exp run -n ntire $(srmodels profile ntire)`, or with --apply write the profile into "
                    "params.yaml (comments kept). The result is validated first either way."), _profile_args,
     cmd_profile),
    ("check", dict(
        help="validate a params file whole: unknown keys anywhere, values, members, pretrained files",
        description="Load and validate every key of the params file, whether or not a stage reads it (a typo in "
                    "a key no stale stage depends on passes `dvc repro` silently), then cross-check: trained "
                    "and fusion.members name backbones entries, members are trained, and each pretrained "
                    "checkpoint that is set exists (paths relative to here, as the stages run). Prints one line; "
                    "exit 0 when valid, 2 with the key at fault otherwise."), _check_args, cmd_check),
    ("summarize", dict(
        help="a seed sweep's finished runs: per model mean ± sd over seeds, the fusion's gain with a CI",
        description="Read the finished pipeline runs (DVC experiments, or MLflow pipeline runs), group them by "
                    "their params other than seed, and write per configuration each model's mean, standard "
                    "deviation and range over seeds, the fusion's gain over its best member (chosen per seed on "
                    "validation) with a 95%% bootstrap interval over seeds x images, and the configurations "
                    "compared pairwise: summary.md (also printed), summary.json, summary.png."), _summarize_args,
     cmd_summarize),
    ("export", dict(
        help="a checkpoint as safetensors (self-describing), the official layout, or ONNX; the ensemble as an "
             "NTIRE submission",
        description="Write WEIGHTS (ours, released, any wrapping, .pth or .safetensors; or the fusion net's "
                    "best.pth) as: safetensors with our description in its metadata (loads with no --arch); the "
                    "official layout ({'params': ...} for DAT, SwinIR, RRDBNet; RFDN's bare dict on 0-255 "
                    "pixels; team 27's fusion layout); or ONNX with dynamic height and width, checked against "
                    "PyTorch with onnxruntime on two sizes (needs the onnx extra). --to ntire writes the trained "
                    "ensemble (the ensemble stage's file or folder) as an NTIRE 2025 SR x4 submission: "
                    "models/teamNN_Name/ (code that imports no srmodels, with main(model_dir, input_path, "
                    "output_path, device)) and model_zoo/teamNN_Name/ (the weights)."), _export_args, cmd_export),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srmodels", description=__doc__.splitlines()[0],
                                     epilog=INPUT_POLICY + " Errors are one line; --debug shows the traceback.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (also: SRMODELS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, texts, add_args, run in _COMMANDS:
        p = sub.add_parser(name, **texts)
        add_args(p)
        p.set_defaults(func=run)
        # also after the command: `srmodels eval --debug ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    debug = args.debug or os.environ.get("SRMODELS_DEBUG", "") not in ("", "0")
    keep_freed_memory()
    try:
        if getattr(args, "cpu_isa", isa.NATIVE) != isa.NATIVE:
            # `srmodels` / `python -m srmodels` pinned it before torch loaded; this refuses a pin that came too
            # late (e.g. `python -m srmodels.cli`) instead of silently running native kernels.
            isa.pin(args.cpu_isa, source="--cpu-isa")
            isa.provenance()
        with torch.inference_mode():
            return args.func(args)
    except UserError as err:
        if debug:
            raise
        # One line whatever the message holds: the file and the problem.
        print(f"srmodels: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
