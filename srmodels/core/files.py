"""Files that appear whole or not at all: one home for atomic writes, deterministic JSON and staged stage outputs.

A single file is written through :func:`atomic` (or :func:`write_text`, :func:`write_bytes`, :func:`write_json`):
it goes to a temporary name beside its target and replaces it by one rename, so a reader or a killed run never
sees half a file.

A stage writes everything into a staging folder and swaps it in by renames only when it succeeded, so a stage
that fails (bad input, Ctrl-C, a crash half way) leaves the previous outputs exactly as they were: every stage,
``prepare`` included, goes through :func:`staged`, which publishes with :func:`swap_in`. The pipeline declares
its outputs ``persist: true`` so that DVC does not delete them before the stage runs either. The command line
checks its output folders with :func:`check_writable` before any work.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from srmodels.core.errors import UserError


def remove(path: Path) -> None:
    """Delete a file, a link or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_writable(folder: str | Path, what: str, error: type[UserError] = UserError) -> None:
    """Raise ``error`` naming ``folder`` (or the file in its way) unless files can be made in it, or it can be made.

    ``what`` names what will be written there, for the message. The check creates and deletes a file in ``folder``
    or, when the folder is yet to be made, in its nearest existing parent: the permission bits do not tell (root
    passes them, but not a read-only mount).
    """
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # '.' or '/' at the latest
    if not existing.is_dir():
        raise error(f"{existing}: is a file, so the folder {folder} for {what} cannot be made under it")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".srmodels-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        wanted = f"{what} in this folder" if existing == folder else f"the folder {folder} for {what} in it"
        raise error(f"{existing}: cannot write {wanted} ({err.strerror or err})") from None


def check_output_file(path: str | Path, what: str, error: type[UserError] = UserError) -> Path:
    """``path`` as a file to write, checked before any work: not a folder, no file among its parents, and files
    can be made in its folder (or the folder can be made); each a one-line ``error`` naming ``what``."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: {what} must be a file, but it is a folder")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise error(f"{blocker}: is a file, so the {what} {path} cannot be written under it")
    check_writable(path.parent, f"the {what} {path.name}", error)
    return path


def swap_in(staging: Path, out_dir: Path, retired: Path, names: Sequence[str]) -> None:
    """Replace the entries ``names`` of ``out_dir`` (nested ones such as ``eval/test`` too) by those in
    ``staging``; other entries of ``out_dir`` stay (DVC's ``.gitignore``, another stage's outputs).

    Renames only, so ``staging`` and ``retired`` (where the previous entries wait until the end) must be on the
    same file system as ``out_dir``. If a rename fails, the new entries are taken out again and the previous
    ones put back. Put a manifest last in ``names``: it then appears only beside a complete set.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    remove(retired)  # a killed run's leftover
    retired.mkdir(parents=True)
    for name in names:
        (retired / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    placed: list[str] = []
    try:
        for name in names:
            if (out_dir / name).exists() or (out_dir / name).is_symlink():
                os.replace(out_dir / name, retired / name)
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, out_dir / name)
                placed.append(name)
    except BaseException:
        for name in placed:
            remove(out_dir / name)
        for name in names:
            if (retired / name).exists() or (retired / name).is_symlink():
                os.replace(retired / name, out_dir / name)
        remove(retired)  # reached only when everything was put back
        raise
    remove(retired)


@contextmanager
def staged(out_dir: str | Path, work: str | Path | None = None, *, whole: bool = False,
           names: Sequence[str] | None = None) -> Iterator[Path]:
    """``with staged(out, work) as tmp: write into tmp``: published to ``out`` only if the block succeeds.

    ``whole``: ``out`` is one output folder and is replaced as a whole (nothing stale survives). Otherwise each
    entry written into ``tmp`` replaces the entry of the same name in ``out`` and other entries stay; ``names``
    fixes the entries this output owns instead (nested ones such as ``eval/test`` too, a manifest last): each is
    replaced, or removed when the block did not write it.

    The staging folder lives under ``work`` (``paths.work``, outside every DVC output and dependency), or beside
    ``out`` when ``work`` is None; it is removed on failure, and a leftover from a killed run is cleared at the
    next start. ``out`` is taken at its real location (a link to it stays a link), where the previous entries
    also wait (``.<name>.old``) while they are swapped.
    """
    out_dir = Path(out_dir)
    real = out_dir.resolve()
    if work is None:
        root = real.parent / f".{real.name}.staging"
    else:
        root = Path(work) / "staging" / str(out_dir).strip("/").replace("/", "__")
    remove(root)
    staging = root / real.name if whole else root
    staging.mkdir(parents=True)
    try:
        yield staging
        retired = real.parent / f".{real.name}.old"
        if whole:
            swap_in(root, real.parent, retired, [real.name])
        else:
            swap_in(root, real, retired, sorted(os.listdir(root)) if names is None else list(names))
    finally:
        remove(root)


@contextmanager
def atomic(path: str | Path, *, tmp_name: str | None = None) -> Iterator[Path]:
    """``with atomic(path) as tmp: write tmp``: ``tmp`` replaces ``path`` by one rename if the block succeeds and
    is deleted if it fails. ``tmp`` sits beside ``path`` (same file system) with the same suffix, which writers
    that choose a format by it (OpenCV, ``np.save``) need; the parent folder is made if missing.

    ``tmp_name`` fixes the temporary file's name, for a writer whose bytes depend on it (``torch.save`` names
    its archive's root folder after the file, see :func:`srmodels.models.checkpoint.save_torch`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` as the whole of ``path``, atomically."""
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) as the whole of ``path``, atomically."""
    write_bytes(path, text.encode())


def json_text(obj: Any) -> str:
    """The project's one JSON form: sorted keys, indent 1, a trailing newline (diffs and hashes stay stable)."""
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as :func:`json_text`, atomically."""
    write_text(path, json_text(obj))
