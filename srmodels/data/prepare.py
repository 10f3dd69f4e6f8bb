"""The ``prepare`` stage: turn the configured image source into the lossless folders every later stage reads.

Layout written under ``out_dir`` (8-bit RGB PNG throughout)::

    train_patches/hr/<stem>_s###.png + lr/<stem>_s###.png   backbone training sub-images
    fusion_train/hr/<stem>.png + lr/<stem>.png               full images the fusion net learns from
    val/hr/<stem>.png + lr/<stem>.png                        model selection only
    eval/<set>/lr/<stem>.png [+ eval/<set>/hr/<stem>.png]    scored sets: 'test' and each data.benchmarks entry
    splits.json                                              the manifest (which stems went where, and how)

Every HR image is mod-cropped to a multiple of ``scale`` and its LR image is exactly HR / scale. An LR image
that is not on disk is made from the HR one with the MATLAB-compatible bicubic of :mod:`srmodels.data.imresize`,
the degradation that produced the DIV2K / Set5 ``LR_bicubic`` files, so made and released LR images agree.

Nothing in ``out_dir`` is touched until every input has been checked: planning lists folders and checks
names and ranges, then every image is read and its sizes checked (one at a time, nothing kept). A typo
in params.yaml, a missing folder, a corrupt image or an LR of the wrong size stops the stage with one
``ParamsError`` / ``ImageError`` naming the key or file. The outputs are then written into a sibling folder
and swapped in only when complete (:func:`srmodels.core.files.staged`), so a failure half way leaves the
previous outputs as they were.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from skimage import data as skdata
from tqdm import tqdm

from srmodels.core import layout
from srmodels.data.images import (IMAGE_SUFFIXES, ImageError, check_pair, list_images, lr_stem, pair_by_stem, read_image,
                     write_image)
from srmodels.data.imresize import downscale_uint8
from srmodels.core.files import staged, write_json
from srmodels.core.params import ParamsError

log = logging.getLogger(__name__)

# The folders (and the manifest) prepare owns inside out_dir; only these are replaced.
OUTPUT_DIRS = (layout.TRAIN_PATCHES, layout.FUSION_TRAIN, layout.VAL, layout.EVAL)
MANIFEST = layout.SPLITS
SPLITS = ("backbone_train", "fusion_train", "val", "test")


def _gray_to_rgb(img: np.ndarray) -> np.ndarray:
    """Repeat a grayscale photograph's channel so every image in the pipeline is HxWx3."""
    return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))


# name -> loader of the scikit-image photographs (bundled with the package: no network needed).
# The stereo pair is one tuple in skimage; its two views are separate images here.
SAMPLE_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": lambda: skdata.astronaut(),
    "chelsea": lambda: skdata.chelsea(),
    "coffee": lambda: skdata.coffee(),
    "rocket": lambda: skdata.rocket(),
    "hubble_deep_field": lambda: skdata.hubble_deep_field(),
    "immunohistochemistry": lambda: skdata.immunohistochemistry(),
    "retina": lambda: skdata.retina(),
    "motorcycle_left": lambda: skdata.stereo_motorcycle()[0],
    "motorcycle_right": lambda: skdata.stereo_motorcycle()[1],
    "camera": lambda: _gray_to_rgb(skdata.camera()),
    "moon": lambda: _gray_to_rgb(skdata.moon()),
    "coins": lambda: _gray_to_rgb(skdata.coins()),
    "clock": lambda: _gray_to_rgb(skdata.clock()),
    "brick": lambda: _gray_to_rgb(skdata.brick()),
    "grass": lambda: _gray_to_rgb(skdata.grass()),
    "gravel": lambda: _gray_to_rgb(skdata.gravel()),
}


@dataclass(frozen=True)
class Entry:
    """One image to prepare: its output stem and where its HR and LR images come from."""

    stem: str
    origin: str                                  # names the source in messages: a file or 'skimage.data.<name>'
    load_hr: Callable[[], np.ndarray] | None     # None: the set has no ground truth (DIV2K_test)
    lr_path: Path | None                         # None: LR is made from the HR with the MATLAB bicubic


@dataclass
class Plan:
    """Every entry of every split, decided before any output is touched."""

    splits: dict[str, list[Entry]]               # backbone_train, fusion_train, val, test
    info: dict[str, Any] = field(default_factory=dict)   # source-specific facts for the manifest


# ---------------------------------------------------------------------------------------------------- helpers


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (the LR is then exactly HR / scale)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def patch_positions(length: int, size: int, step: int) -> list[int]:
    """Top (or left) offsets of sub-images along one side: every ``step``, plus one flush with the far edge.

    The extra last position keeps the border rows/columns in the training data when ``step`` does not divide
    ``length - size``. Empty when ``length < size``.
    """
    if length < size:
        return []
    positions = list(range(0, length - size + 1, step))
    if positions[-1] != length - size:
        positions.append(length - size)
    return positions


def extract_patches(
    hr: np.ndarray, lr: np.ndarray, hr_size: int, step: int, scale: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(HR sub-image, matching LR sub-image) pairs, row-major. HR offsets are multiples of ``scale``."""
    lr_size = hr_size // scale
    for y in patch_positions(hr.shape[0], hr_size, step):
        for x in patch_positions(hr.shape[1], hr_size, step):
            ly, lx = y // scale, x // scale
            yield hr[y : y + hr_size, x : x + hr_size], lr[ly : ly + lr_size, lx : lx + lr_size]


def _check_rgb(img: np.ndarray, origin: str) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(f"{origin}: expected an HxWx3 uint8 image, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


def _read_checked(entry: Entry, scale: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(mod-cropped HR or None, given LR or None) of one entry, with every check ``load_pair`` makes."""
    hr = None
    if entry.load_hr is not None:
        hr = _check_rgb(entry.load_hr(), entry.origin)
        if hr.shape[0] < scale or hr.shape[1] < scale:
            raise ImageError(f"{entry.origin}: {hr.shape[1]}x{hr.shape[0]} is smaller than the scale x{scale}")
    if entry.lr_path is None:
        if hr is None:
            raise ImageError(f"{entry.origin}: neither an HR nor an LR image")
        return np.ascontiguousarray(mod_crop(hr, scale)), None
    lr = read_image(entry.lr_path)
    if hr is not None:
        # check_pair accepts exactly HR // scale per side, i.e. the size of the mod-cropped HR / scale.
        hr = np.ascontiguousarray(check_pair(hr, lr, scale, Path(entry.origin), entry.lr_path))
    return hr, lr


def check_entry(entry: Entry, scale: int) -> tuple[int, int] | None:
    """Decode and check one entry's files as ``load_pair`` would, keeping nothing (no LR is made).

    Returns the (height, width) its HR will have (mod-cropped), None for an LR-only entry.
    """
    hr, _ = _read_checked(entry, scale)
    return None if hr is None else (hr.shape[0], hr.shape[1])


def load_pair(entry: Entry, scale: int) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """(mod-cropped HR or None, LR, whether the LR was made here) for one entry.

    A given LR must be exactly the mod-cropped HR / scale, else ImageError naming the LR file.
    """
    hr, lr = _read_checked(entry, scale)
    if lr is None:
        assert hr is not None
        return hr, downscale_uint8(hr, scale), True
    return hr, lr, False


def _hr_entry(stem: str, hr_path: Path, lr_path: Path | None) -> Entry:
    return Entry(stem=stem, origin=str(hr_path), load_hr=partial(read_image, hr_path), lr_path=lr_path)


def _lr_by_stem(folder: Path, scale: int) -> dict[str, Path]:
    """LR files of an optional folder keyed by HR stem ('0001x4' -> '0001'); {} when the folder is absent."""
    if not folder.is_dir():
        return {}
    return {lr_stem(p.stem, scale): p for p in list_images(folder)}


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p


# ---------------------------------------------------------------------------------------------------- planning


def plan_samples(samples: dict[str, list[str]]) -> Plan:
    """Split the scikit-image photographs as ``data.samples`` says; unknown or repeated names are errors."""
    seen: dict[str, str] = {}
    splits: dict[str, list[Entry]] = {}
    for split in SPLITS:
        for name in samples[split]:
            if name not in SAMPLE_LOADERS:
                raise ParamsError(f"data.samples.{split}: unknown sample {name!r}; "
                                  f"valid: {', '.join(sorted(SAMPLE_LOADERS))}")
            if name in seen:
                where = "twice" if seen[name] == split else f"in both {seen[name]} and {split}"
                raise ParamsError(f"data.samples.{split}: {name!r} is listed {where} (splits must not overlap)")
            seen[name] = split
        splits[split] = [Entry(stem=name, origin=f"skimage.data.{name}", load_hr=SAMPLE_LOADERS[name], lr_path=None)
                         for name in sorted(samples[split])]
    return Plan(splits=splits, info={"test_set": "skimage.data"})


def _check_ranges(div2k: dict[str, Any]) -> None:
    ranges = {s: div2k[s] for s in ("backbone_train", "fusion_train", "val")}
    names = list(ranges)
    for i, a in enumerate(names):
        lo, hi = ranges[a]
        if lo < 1:
            raise ParamsError(f"data.div2k.{a}: image numbers start at 1, got {ranges[a]}")
        for b in names[i + 1 :]:
            if lo <= ranges[b][1] and ranges[b][0] <= hi:
                raise ParamsError(f"data.div2k.{b}: {ranges[b]} overlaps data.div2k.{a} {ranges[a]} "
                                  "(splits must not overlap)")


def plan_div2k(div2k: dict[str, Any], scale: int, base_dir: Path) -> Plan:
    """Entries for the standard DIV2K layout under ``data.div2k.root`` (relative to ``base_dir``).

    Train splits are inclusive number ranges inside DIV2K_train; the test set is DIV2K_valid (with HR) or
    DIV2K_test (LR only). A missing HR folder or image is an ImageError naming the path; a missing LR folder or
    file means the LR is made with the MATLAB bicubic.
    """
    _check_ranges(div2k)
    root = _resolve(div2k["root"], base_dir)
    if not root.is_dir():
        raise ImageError(f"{root}: DIV2K root (data.div2k.root) not found; expected DIV2K_train_HR, "
                         f"DIV2K_train_LR_bicubic/X{scale}, DIV2K_valid_HR, ... inside it")
    lr_sub = f"X{scale}"
    train_hr = {p.stem: p for p in list_images(root / "DIV2K_train_HR")}
    train_lr = _lr_by_stem(root / "DIV2K_train_LR_bicubic" / lr_sub, scale)
    splits: dict[str, list[Entry]] = {}
    for split in ("backbone_train", "fusion_train", "val"):
        first, last = div2k[split]
        entries = []
        for n in range(first, last + 1):
            stem = f"{n:04d}"
            if stem not in train_hr:
                raise ImageError(f"{root / 'DIV2K_train_HR' / (stem + '.png')}: no such image "
                                 f"(data.div2k.{split} = {div2k[split]})")
            entries.append(_hr_entry(stem, train_hr[stem], train_lr.get(stem)))
        splits[split] = entries

    if div2k["test"] == "valid":
        valid_lr = _lr_by_stem(root / "DIV2K_valid_LR_bicubic" / lr_sub, scale)
        splits["test"] = [_hr_entry(p.stem, p, valid_lr.get(p.stem)) for p in list_images(root / "DIV2K_valid_HR")]
        test_set = "DIV2K_valid"
    else:
        lr_files = list_images(root / "DIV2K_test_LR_bicubic" / lr_sub)
        splits["test"] = [Entry(stem=lr_stem(p.stem, scale), origin=str(p), load_hr=None, lr_path=p)
                          for p in lr_files]
        test_set = "DIV2K_test"
    if not splits["test"]:
        raise ImageError(f"{root}: the {test_set} folder holds no images")
    return Plan(splits=splits, info={"root": div2k["root"], "test_set": test_set})


_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SET_NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit"


def valid_set_name(name: str) -> bool:
    """Whether ``name`` can name a scored set (it becomes a folder name and a table column)."""
    return bool(_SET_NAME.match(name))


def set_folders(folder: Path, scale: int, *, what: str) -> tuple[Path, Path | None]:
    """(HR folder, LR folder or None) of a benchmark folder laid out as papers ship them.

    HR images are in ``folder/HR/``, or directly in ``folder`` when it has no ``HR/`` subfolder (so a bare
    folder of images is a set too); given LR images are in ``folder/LR_bicubic/X<scale>/``, and when that
    folder is absent the LR images are made from HR. ``what`` names the setting or argument in messages.
    """
    if not folder.is_dir():
        raise ImageError(f"{folder}: benchmark folder of {what} not found")
    hr_dir = folder / "HR"
    if not hr_dir.is_dir():
        if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            raise ImageError(f"{hr_dir}: no such folder, and {folder} holds no images itself ({what})")
        hr_dir = folder
    lr_dir = folder / "LR_bicubic" / f"X{scale}"
    return hr_dir, lr_dir if lr_dir.is_dir() else None


def plan_set(hr_dir: Path, lr_dir: Path | None, scale: int, *, what: str) -> list[Entry]:
    """Entries of one scored set: every image of ``hr_dir`` (sorted by name), each paired with its LR in
    ``lr_dir`` (``bird`` <-> ``birdx4``; an HR without its LR is an error), or with LR made from HR when
    ``lr_dir`` is None. An empty set or two HR files with one stem are errors naming ``what``."""
    hr_files = list_images(hr_dir)
    if not hr_files:
        raise ImageError(f"{hr_dir}: no images ({what})")
    stems: dict[str, Path] = {}
    for path in hr_files:
        if path.stem in stems:  # both would be scored, and prepared into one file, under one name
            raise ImageError(f"{path}: same name as {stems[path.stem].name} ({what}); keep one")
        stems[path.stem] = path
    if lr_dir is None:
        return [_hr_entry(p.stem, p, None) for p in hr_files]
    return [_hr_entry(hr.stem, hr, lr) for hr, lr in pair_by_stem(hr_files, list_images(lr_dir), scale)]


def plan_benchmark(name: str, folder: str, scale: int, base_dir: Path) -> list[Entry]:
    """Entries of one extra scored set ``data.benchmarks.<name>`` (a folder as :func:`set_folders` describes).

    When the LR folder exists every HR needs its LR (``bird`` <-> ``birdx4``); otherwise LR is made here.
    ``srmodels eval --set`` reads its folders with the same two functions.
    """
    if not valid_set_name(name) or name == "test":
        raise ParamsError(f"data.benchmarks.{name}: not usable as a set name ({SET_NAME_RULE}; "
                          "'test' is the main test set)")
    what = f"data.benchmarks.{name}"
    hr_dir, lr_dir = set_folders(_resolve(folder, base_dir), scale, what=what)
    return plan_set(hr_dir, lr_dir, scale, what=what)


# ---------------------------------------------------------------------------------------------------- writing


def _write_full(folder: Path, stem: str, hr: np.ndarray | None, lr: np.ndarray) -> None:
    write_image(folder / layout.LR / f"{stem}.png", lr)
    if hr is not None:
        write_image(folder / layout.HR / f"{stem}.png", hr)


def _write_patches(folder: Path, stem: str, hr: np.ndarray, lr: np.ndarray, hr_size: int, step: int,
                   scale: int) -> int:
    """Write one image's sub-images; returns how many (0 when the image is smaller than ``hr_size``)."""
    count = 0
    for count, (hr_patch, lr_patch) in enumerate(extract_patches(hr, lr, hr_size, step, scale), start=1):
        write_image(folder / layout.HR / f"{stem}_s{count:03d}.png", hr_patch)
        write_image(folder / layout.LR / f"{stem}_s{count:03d}.png", lr_patch)
    return count


def _progress(entries: list[Entry], desc: str) -> Iterator[Entry]:
    # disable=None: a bar on a terminal, silence in redirected logs.
    return iter(tqdm(entries, desc=desc, unit="img", disable=None, leave=False))


def prepare(data: dict[str, Any], scale: int, out_dir: Path, base_dir: Path | None = None, *,
            with_benchmarks: bool = True) -> dict[str, Any]:
    """Write the training, validation and evaluation folders and ``out_dir/splits.json``; return the manifest.

    Args:
        data: the validated ``params['data']`` section.
        scale: the super-resolution factor (LR = HR / scale).
        out_dir: where the layout described in the module docstring is written (its own subfolders and
            manifest are replaced as a whole on success; other files in it are left alone).
        base_dir: what relative paths in ``data`` (DIV2K root, benchmark folders) are relative to; default the
            current directory, i.e. the repository root when DVC runs the stage.
        with_benchmarks: also write ``data['benchmarks']`` under ``eval/``, which then belongs to this call as a
            whole. False (the pipeline, where each set is its own ``benchmark@<name>`` stage, see
            :func:`prepare_benchmark`): only ``eval/test`` is written and replaced, other ``eval/<set>`` stay.

    Raises:
        ParamsError: unknown sample names, overlapping splits, unusable patch or set settings.
        ImageError: a missing folder or image, a corrupt file, an LR whose size is not HR / scale.
    """
    out_dir = Path(out_dir)
    base_dir = Path.cwd() if base_dir is None else Path(base_dir)
    hr_size, step = data["patches"]["hr_size"], data["patches"]["step"]
    if hr_size < scale or hr_size % scale:
        raise ParamsError(f"data.patches.hr_size: must be a positive multiple of scale {scale}, got {hr_size}")
    if step < scale or step % scale:
        # An HR offset that is not a multiple of scale has no exact LR counterpart.
        raise ParamsError(f"data.patches.step: must be a positive multiple of scale {scale}, got {step}")

    # Plan everything first: configuration and input errors must not destroy the previous output.
    plan = plan_samples(data["samples"]) if data["source"] == "samples" else plan_div2k(data["div2k"], scale, base_dir)
    eval_sets: dict[str, list[Entry]] = {"test": plan.splits["test"]}
    for name in sorted(data["benchmarks"]) if with_benchmarks else ():
        eval_sets[name] = plan_benchmark(name, data["benchmarks"][name], scale, base_dir)
    shared = data["fusion_split"] == "shared"
    if shared and plan.splits["fusion_train"]:
        log.info("fusion_split is 'shared': the fusion net learns from the backbone_train images; the "
                 "%d configured fusion_train image(s) are not used", len(plan.splits["fusion_train"]))
    fusion_entries = plan.splits["backbone_train"] if shared else plan.splits["fusion_train"]

    # Read and check every input before anything is written: a corrupt image or a wrong LR size stops the
    # stage with its name while the previous outputs are untouched. One image at a time, nothing kept.
    to_check = [*plan.splits["backbone_train"], *([] if shared else fusion_entries), *plan.splits["val"],
                *(e for entries in eval_sets.values() for e in entries)]
    for entry in _progress(to_check, "checking inputs"):
        check_entry(entry, scale)
    log.info("checked %d input image(s)", len(to_check))

    # Written into a staging folder and swapped in at the end, so that a failure half way (a full disk, an
    # interrupt, a file changed since the check) leaves the previous outputs as they were. The staging folder is
    # beside out_dir's real location, so out_dir may be a link to another disk.
    owned = (*OUTPUT_DIRS[:-1], layout.EVAL if with_benchmarks else f"{layout.EVAL}/test", MANIFEST)
    with staged(out_dir, names=owned) as staging:
        manifest = _write_outputs(plan, eval_sets, fusion_entries, shared, data, scale, hr_size, step, staging)
    log.info("prepared %d training patches from %d images, %d fusion, %d val, eval sets %s in %s",
             manifest["num_patches"], len(plan.splits["backbone_train"]), len(fusion_entries),
             len(plan.splits["val"]), ", ".join(f"{k} ({len(v)})" for k, v in eval_sets.items()), out_dir)
    return manifest


def _write_outputs(plan: Plan, eval_sets: dict[str, list[Entry]], fusion_entries: list[Entry], shared: bool,
                   data: dict[str, Any], scale: int, hr_size: int, step: int, out_dir: Path) -> dict[str, Any]:
    """Write every image and the manifest under ``out_dir`` (an empty folder); return the manifest."""
    lr_made: dict[str, list[str]] = {}
    patches_per_image: dict[str, int] = {}
    skipped: list[str] = []

    def note_made(split: str, stem: str, made: bool) -> None:
        if made:
            lr_made.setdefault(split, []).append(stem)

    for entry in _progress(plan.splits["backbone_train"], "backbone_train"):
        hr, lr, made = load_pair(entry, scale)
        assert hr is not None  # training splits always have HR
        note_made("backbone_train", entry.stem, made)
        n = _write_patches(out_dir / layout.TRAIN_PATCHES, entry.stem, hr, lr, hr_size, step, scale)
        if n == 0:
            log.warning("%s: %dx%d is smaller than the %d-pixel sub-image; no training patches from it",
                        entry.origin, hr.shape[1], hr.shape[0], hr_size)
            skipped.append(entry.stem)
        patches_per_image[entry.stem] = n
        if shared:
            # Same images, loaded once: the full pair is what the fusion net learns from.
            _write_full(out_dir / layout.FUSION_TRAIN, entry.stem, hr, lr)
    if not shared:
        for entry in _progress(fusion_entries, "fusion_train"):
            hr, lr, made = load_pair(entry, scale)
            note_made("fusion_train", entry.stem, made)
            _write_full(out_dir / layout.FUSION_TRAIN, entry.stem, hr, lr)
    for entry in _progress(plan.splits["val"], "val"):
        hr, lr, made = load_pair(entry, scale)
        note_made("val", entry.stem, made)
        _write_full(out_dir / layout.VAL, entry.stem, hr, lr)
    has_hr: dict[str, bool] = {}
    for name, entries in eval_sets.items():
        for entry in _progress(entries, f"eval/{name}"):
            hr, lr, made = load_pair(entry, scale)
            note_made(f"eval/{name}", entry.stem, made)
            _write_full(out_dir / layout.EVAL / name, entry.stem, hr, lr)
        has_hr[name] = all(e.load_hr is not None for e in entries)
    for split, stems in lr_made.items():
        log.info("%s: LR of %d image(s) made from HR with the MATLAB bicubic (no LR file given)", split, len(stems))

    num_patches = sum(patches_per_image.values())
    manifest: dict[str, Any] = {
        "source": data["source"],
        **plan.info,
        "scale": scale,
        "fusion_split": data["fusion_split"],
        # Says outright where the fusion images came from: 'backbone_train' means the fusion net sees the
        # backbones' own training images (team 27's setup), so its val/test scores are the honest ones.
        "fusion_train_from": "backbone_train" if shared else "fusion_train",
        "splits": {
            "backbone_train": [e.stem for e in plan.splits["backbone_train"]],
            "fusion_train": [e.stem for e in fusion_entries],
            "val": [e.stem for e in plan.splits["val"]],
            "eval": {name: [e.stem for e in entries] for name, entries in eval_sets.items()},
        },
        "eval_has_hr": has_hr,
        "patches": {"hr_size": hr_size, "lr_size": hr_size // scale, "step": step},
        "num_patches": num_patches,
        "patches_per_image": patches_per_image,
        "skipped_small": skipped,
        "lr_made": lr_made,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def prepare_benchmark(name: str, folder: str, scale: int, out_dir: Path, base_dir: Path | None = None) -> int:
    """Write one ``data.benchmarks`` set as an eval set (``lr/`` and ``hr/`` PNGs) into the empty ``out_dir``.

    Every image is read and checked before the first is written; returns the number of images. The pipeline's
    ``benchmark@<name>`` stage gives a staging folder and publishes it as ``<prepared>/eval/<name>``.
    """
    base_dir = Path.cwd() if base_dir is None else Path(base_dir)
    entries = plan_benchmark(name, folder, scale, base_dir)
    for entry in _progress(entries, f"checking {name}"):
        check_entry(entry, scale)
    made = 0
    for entry in _progress(entries, f"eval/{name}"):
        hr, lr, lr_made = load_pair(entry, scale)
        made += lr_made
        _write_full(Path(out_dir), entry.stem, hr, lr)
    if made:
        log.info("%s: LR of %d image(s) made from HR with the MATLAB bicubic (no LR file given)", name, made)
    return len(entries)
