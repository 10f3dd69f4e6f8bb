"""Stage outputs that appear all at once, and the run record that sits beside them.

A stage writes everything into a staging folder and publishes it only when it succeeded, so a stage that fails
(bad input, Ctrl-C, a crash half way) leaves the previous outputs exactly as they were. The pipeline declares
its outputs ``persist: true`` so that DVC does not delete them before the stage runs either.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _swap_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; the old folder is renamed aside first and deleted last."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old.exists():
            os.replace(old, target)  # put the previous outputs back
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish(staging: Path, out_dir: Path, *, whole: bool) -> None:
    """Move the staged outputs into place.

    ``whole``: ``out_dir`` is one output folder and is replaced as a whole (nothing stale survives). Otherwise
    each entry of ``staging`` replaces the entry of the same name in ``out_dir`` and other entries stay (DVC's
    ``.gitignore``, another stage's files).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if whole:
        _swap_dir(staging, out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        target = out_dir / entry.name
        if entry.is_dir():
            _swap_dir(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged(out_dir: str | Path, work: str | Path, *, whole: bool = False) -> Iterator[Path]:
    """``with staged(out, work) as tmp: write into tmp``: published to ``out`` only if the block succeeds.

    The staging folder lives under ``work`` (``paths.work``, outside every DVC output and dependency) and is
    removed on failure; a leftover from a killed run is cleared at the next start.
    """
    out_dir, work = Path(out_dir), Path(work)
    staging = work / "staging" / str(out_dir).strip("/").replace("/", "__")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out_dir, whole=whole)


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
