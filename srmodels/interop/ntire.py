"""The trained ensemble as a submission to the NTIRE 2025 image SR x4 challenge (``srmodels export --to ntire``).

The challenge's repository (zhengchen1999/NTIRE2025_ImageSR_x4) holds each team's code in
``models/teamNN_Name/``, a package whose ``main(model_dir, input_path, output_path, device)`` its ``test.py``
imports and calls, and the team's weights in ``model_zoo/teamNN_Name/``, the folder ``model_dir`` names.
:func:`export_ntire` writes both under one folder (a clone of that repository, or a new folder):

* ``models/teamNN_Name/``: the hand-written ``__init__.py`` and ``ensemble.py`` of ``ntire_team/`` beside this
  module (``main``: read the LR PNGs, run the ensemble, write the SR PNGs), copied verbatim, and the srmodels
  sources they run, copied at export time: the architectures (``srmodels/archs``: the members' files, and those
  the CPU kernels import), ``srmodels/models/accelerate.py`` and ``inference.py`` whole, and from
  ``srmodels/models/fusion.py``, ``model.py`` and ``srmodels/data/images.py`` only the definitions it needs
  (:data:`EXTRACTS`: the fusion nets, ``SRModel``, the tensor conversions), unchanged but for their srmodels
  imports, which become package-relative. The package imports nothing of srmodels (checked on the written files,
  :func:`srmodels_imports`), so it runs where srmodels is not installed.
* ``model_zoo/teamNN_Name/ensemble.safetensors``: the ensemble file itself.

The team's ``main`` computes the steps of :meth:`srmodels.models.ensemble.Ensemble.upscale_image` with the same
code, so on the CPU, with the kernels pinned as the pipeline ran (the file's ``kernels``), its PNGs are the test
stage's bit for bit. Nothing is written unless everything is: both folders are built in a hidden folder beside
them and renamed into place.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import srmodels
from srmodels.core.errors import UserError
from srmodels.core.files import check_writable, remove
from srmodels.core.isa import environment
from srmodels.core.layout import ENSEMBLE
from srmodels.interop.export import ExportError
from srmodels.models.ensemble import find_ensemble, load_ensemble, read_ensemble

__all__ = ["export_ntire", "NtireSubmission", "package_files", "srmodels_imports", "DEFAULT_TEAM", "DEFAULT_NAME",
           "EXTRACTS"]

log = logging.getLogger(__name__)

# Team 27 entered the fusion this pipeline rebuilds; the name is the package's part of teamNN_Name.
DEFAULT_TEAM = 27
DEFAULT_NAME = "SRModels"
# test.py imports the package by a plain ``from models.teamNN_Name import main``: the name must be an identifier.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
TEMPLATE = Path(__file__).with_name("ntire_team")  # the hand-written files, as <name>.py.in
# The challenge asks for a download link instead of weights above this size (its README).
LINK_ABOVE_BYTES = 100 * 1000 * 1000

# Modules the team package runs whole: the template's imports and the accelerated members' kernels.
ROOTS = ("srmodels.archs", "srmodels.models.accelerate", "srmodels.models.inference")
# Modules whose other definitions load checkpoints through srmodels: the names (and the top-level definitions
# they use) that the package runs, extracted unchanged.
EXTRACTS: dict[str, tuple[str, ...]] = {
    "srmodels.models.fusion": ("FUSION_KINDS", "fuse", "fusion_inputs", "fusion_kind"),
    "srmodels.models.model": ("SRModel",),
    "srmodels.data.images": ("to_tensor", "to_uint8"),
}


@dataclass
class NtireSubmission:
    """What :func:`export_ntire` wrote."""

    code: Path      # models/teamNN_Name
    weights: Path   # model_zoo/teamNN_Name/ensemble.safetensors
    package: str    # teamNN_Name

    def summary(self) -> str:
        return (f"{self.code}/ and {self.weights}: add to the challenge's test.py "
                f"`from models.{self.package} import main` with model_dir "
                f"os.path.join('model_zoo', '{self.package}')")


# --- the package's modules -------------------------------------------------------------------------------------


def _target(module: str) -> str:
    """Where an srmodels module lives inside the team package (dotted, relative to it; '' is the package):
    ``srmodels.archs[.x]`` keeps its folder, any other module sits at the top."""
    parts = module.split(".")
    if parts[0] != "srmodels":
        raise ValueError(f"{module}: not an srmodels module")
    if parts[1:2] == ["archs"]:
        return ".".join(parts[1:])
    return parts[-1] if len(parts) > 1 else ""


def _file_of(target: str, is_package: bool) -> str:
    """The package-relative file of a module target."""
    return "/".join(target.split(".") + ["__init__.py"]) if is_package else target.replace(".", "/") + ".py"


def _relative(importer: str, importer_is_package: bool, target: str) -> str:
    """The relative module name by which ``importer`` (a target) reaches ``target``: ``.x``, ``..archs.dat``."""
    here = importer.split(".") if importer else []
    if not importer_is_package:
        here = here[:-1]
    there = target.split(".") if target else []
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    return "." * (len(here) - common + 1) + ".".join(there[common:])


def _srmodels_module(node: ast.AST) -> list[str]:
    """The srmodels modules an import statement names (absolute imports only)."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        return []
    return [n for n in names if n == "srmodels" or n.startswith("srmodels.")]


def _rewrite_imports(source: str, module: str, importer: str, is_package: bool,
                     provides: dict[str, set[str]]) -> tuple[str, set[str]]:
    """``source`` with every ``from srmodels.x import ...`` (at any depth) made package-relative, and the
    srmodels modules it imports. ``provides``: extracted module -> the names it holds."""
    lines = source.splitlines(keepends=True)
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        found = _srmodels_module(node)
        if not found:
            continue
        if isinstance(node, ast.Import):
            raise RuntimeError(f"{module}, line {node.lineno}: `import {found[0]}` cannot be made package-relative "
                               "for the NTIRE export (write it `from ... import ...`)")
        target = node.module
        if target == "srmodels":  # `from srmodels import archs`: submodules of the package
            targets = [f"srmodels.{a.name}" for a in node.names]
        else:
            targets = [target]
            names = provides.get(target)
            if names is not None:
                missing = [a.name for a in node.names if a.name not in names]
                if missing:
                    raise RuntimeError(f"{module}, line {node.lineno}: imports {', '.join(missing)} from {target}, "
                                       f"of which the NTIRE export takes only {', '.join(sorted(names))}")
        imported.update(targets)
        line = lines[node.lineno - 1]
        head = re.compile(r"from\s+" + re.escape(target) + r"(?=\s)")
        m = head.match(line, node.col_offset)
        assert m is not None, f"{module}, line {node.lineno}: unexpected import layout"
        rel = _relative(importer, is_package, _target(target))
        lines[node.lineno - 1] = line[:m.start()] + f"from {rel}" + line[m.end():]
    return "".join(lines), imported


def _bound_names(node: ast.stmt) -> list[str]:
    """The names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _segment(lines: list[str], node: ast.stmt) -> str:
    """A top-level statement's source with its decorators and the comment lines right above it."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return "".join(lines[start:node.end_lineno])


def _extract(source: str, module: str, names: Iterable[str]) -> str:
    """The top-level definitions of ``module`` that ``names`` need (themselves and what they use, in the
    module's order), with the imports those use, as a module of their own."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    defined = {name: node for node in tree.body for name in _bound_names(node)}
    wanted = [n for n in names if n not in defined]
    if wanted:
        raise RuntimeError(f"{module} no longer defines {', '.join(wanted)} (the NTIRE export takes them)")
    keep: set[ast.stmt] = set()
    todo = list(names)
    while todo:
        node = defined[todo.pop()]
        if node not in keep:
            keep.add(node)
            todo += [n for n in _used_names(node) if n in defined]
    used = set().union(*(_used_names(node) for node in keep))
    imports, body = [], []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            imports.append(ast.get_source_segment(source, node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            aliases = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
            if aliases:
                if _srmodels_module(node):
                    raise RuntimeError(f"{module}: what the NTIRE export takes of it ({', '.join(names)}) uses "
                                       f"an srmodels import (line {node.lineno})")
                spelled = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)
                imports.append(f"from {'.' * node.level}{node.module or ''} import {spelled}"
                               if isinstance(node, ast.ImportFrom) else f"import {spelled}")
        elif node in keep:
            body.append(_segment(lines, node).rstrip("\n"))
    doc = (f'"""From {module} (srmodels {srmodels.__version__}): {", ".join(names)} and the definitions they '
           'use, unchanged."""')
    return "\n".join([doc] + imports) + "\n\n\n" + "\n\n\n".join(body) + "\n"


def _source(module: str) -> tuple[str, bool]:
    """An srmodels module's source text and whether it is a package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{module}: not found")
    return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None


def _header(module: str, how: str) -> str:
    return (f"# From {module} (srmodels {srmodels.__version__}), copied by `srmodels export --to ntire`{how}.\n")


def package_files(archs: Iterable[str]) -> dict[str, str]:
    """The team package's srmodels-derived files (package-relative path -> text) for members of ``archs``:
    the modules of :data:`ROOTS`, the members' architectures and every srmodels module those import, whole or
    (:data:`EXTRACTS`) in part, imports made package-relative."""
    provides = {module: set(names) for module, names in EXTRACTS.items()}
    files: dict[str, str] = {}
    todo = [*ROOTS, *(f"srmodels.archs.{a}" for a in archs), *EXTRACTS]
    done: set[str] = set()
    while todo:
        module = todo.pop(0)
        if module in done:
            continue
        done.add(module)
        source, is_package = _source(module)
        target = _target(module)
        if module in EXTRACTS:
            text = _extract(source, module, EXTRACTS[module])
            how = f" ({', '.join(EXTRACTS[module])} and the definitions they use)"
        else:
            text, how = source, ""
        text, imported = _rewrite_imports(text, module, target, is_package, provides)
        files[_file_of(target, is_package)] = _header(module, how or ", imports made package-relative") + text
        todo += sorted(imported - done)
    return files


# --- the check ---------------------------------------------------------------------------------------------------


def srmodels_imports(folder: str | Path) -> list[str]:
    """Every import of srmodels in the Python files under ``folder`` (at any depth of a file, lazy ones
    included), as ``file:line: statement``; empty for a package that runs without srmodels."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source, str(path))):
            if _srmodels_module(node):
                found.append(f"{path.relative_to(folder)}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def _unresolved_imports(package: Path) -> list[str]:
    """Relative imports in ``package`` that name no module of it (a file the export forgot), as
    ``file:line: module``. ``from . import name`` counts as resolved where the folder is a package."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            where = base.joinpath(*node.module.split(".")) if node.module else base
            if not (where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()):
                missing.append(f"{path.relative_to(package)}:{node.lineno}: {'.' * node.level}{node.module or ''}")
    return missing


# --- writing -----------------------------------------------------------------------------------------------------


def _readme(team: int, name: str, spec: dict, files: Iterable[str], weights_bytes: int) -> str:
    package = f"team{team:02d}_{name}"
    kernels = spec.get("kernels") or {}
    level, threads = kernels.get("cpu_isa"), kernels.get("threads")
    try:
        pin = " ".join(f"{k}={v}" for k, v in environment(level).items()) if level else ""
    except UserError:
        pin = ""
    members = ", ".join(f"{m['name']} ({m['model'].get('variant') or m['model']['arch']})" for m in spec["members"])
    inf = spec["inference"]
    tiling = "whole images" if inf["tile"] is None else f"LR tiles of {inf['tile']} px"
    lines = [
        f"# {package}",
        "",
        f"The srmodels ensemble ({members}, fused by the `{spec['fusion']['arch']}` net; x8 self-ensemble "
        f"{'on' if inf['self_ensemble'] else 'off'}, {tiling}) for the NTIRE 2025 image SR x4 "
        "challenge. Its `main(model_dir, input_path, output_path, device)` upscales every PNG/JPEG in "
        "`input_path` by 4 and writes `output_path/<input stem>.png`; `model_dir` is "
        f"`model_zoo/{package}` (or the `.safetensors` file in it).",
        "",
        "In the challenge's `test.py`, `select_model`:",
        "",
        "```python",
        f"    elif model_id == {team}:",
        f"        from models.{package} import main as model_func",
        f"        name = f\"{{model_id:02}}_{name}\"",
        f"        model_path = os.path.join('model_zoo', '{package}')",
        "```",
        "",
        "Needs torch, numpy, opencv-python and safetensors; not srmodels.",
        "",
    ]
    run_as = f"the kernels pinned before torch loads ({pin})" if pin else "the same kind of CPU"
    if threads:
        run_as += f" and {threads} intra-op threads (`main` sets them on the CPU)"
    lines += [f"On the CPU the outputs are the srmodels pipeline's test-stage PNGs bit for bit when run as it ran: "
              f"{run_as}. On CUDA the members run on other kernels and the outputs may differ in the last bits.",
              ""]
    if weights_bytes > LINK_ABOVE_BYTES:
        lines += [f"The weights ({weights_bytes / 1e6:.0f} MB) exceed the challenge's 100 MB: put a download link "
                  f"in `model_zoo/{package}/{package}.txt`.", ""]
    lines += ["Files copied from srmodels " + srmodels.__version__ + ": " + ", ".join(sorted(files)) + "."]
    return "\n".join(lines) + "\n"


def _check_target(folder: Path, what: str) -> None:
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise ExportError(f"{folder}: is a file, so the {what} cannot be written there")
    if folder.is_dir() and any(folder.iterdir()):
        raise ExportError(f"{folder}: the {what} folder exists and is not empty; remove it or choose another -o")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder in ``out`` (made, with its missing parents) removed afterwards; on failure the folders
    made for it go too."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".srmodels-ntire-", dir=out))
    except OSError as err:
        raise ExportError(f"{out}: cannot make the export folder ({err.strerror or err})") from None
    ok = False
    try:
        yield stage
        ok = True
    except OSError as err:
        raise ExportError(f"{out}: cannot write the export ({err.strerror or err})") from None
    finally:
        remove(stage)
        if not ok:
            for folder in made:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _publish(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staged folder onto its target (absent, or an empty folder); on failure undo the renames."""
    done: list[tuple[Path, Path, list[Path], bool]] = []
    try:
        for src, dst in staged:
            made = [p for p in dst.parents if not p.exists()]  # deepest first
            dst.parent.mkdir(parents=True, exist_ok=True)
            was_empty_folder = dst.is_dir()
            if was_empty_folder:
                dst.rmdir()  # checked empty: the staged folder takes its place
            done.append((src, dst, made, was_empty_folder))
            os.replace(src, dst)
    except BaseException:
        for src, dst, made, was_empty_folder in reversed(done):
            with contextlib.suppress(OSError):
                if dst.is_dir() and not src.exists():
                    os.replace(dst, src)
                if was_empty_folder:
                    dst.mkdir()
                for folder in made:
                    folder.rmdir()
        raise


def export_ntire(weights: str | Path, out: str | Path, *, team: int = DEFAULT_TEAM,
                 name: str = DEFAULT_NAME) -> NtireSubmission:
    """Write the ensemble ``weights`` (an ensemble file, or a folder :func:`find_ensemble` reads) as a
    submission under ``out``: ``models/teamNN_Name/`` and ``model_zoo/teamNN_Name/`` (see the module docstring).

    ``out`` may exist (a clone of the challenge's repository); the two folders may not hold anything yet. Each
    problem is a one-line ``ExportError`` (``CheckpointError`` for a damaged file), raised before anything is
    written, and a failure while writing leaves nothing behind.
    """
    if isinstance(team, bool) or not isinstance(team, int) or not 0 <= team <= 99:
        raise ExportError(f"team {team!r}: the challenge's team numbers are 0 to 99 (written with two digits)")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExportError(f"team name {name!r}: letters, digits and '_' only, starting with a letter or digit "
                          "(test.py imports models.teamNN_Name)")
    package = f"team{team:02d}_{name}"
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"{blocker}: is a file, so the export (-o) {out} cannot be written under it")
    code_dir, zoo_dir = out / "models" / package, out / "model_zoo" / package
    _check_target(code_dir, "team code")
    _check_target(zoo_dir, "team weights")
    check_writable(out, "the NTIRE submission", ExportError)
    file = find_ensemble(weights)
    if file is None:
        raise ExportError(f"{weights}: not an ensemble file (no srmodels_ensemble metadata); export the ensemble "
                          f"stage's {ENSEMBLE} (a single model's checkpoint has no NTIRE layout)")
    spec, _ = read_ensemble(file)
    load_ensemble(file, accelerated=False)  # refuses here what the team's main could not load
    files = package_files(sorted({m["model"]["arch"] for m in spec["members"]}))
    size = file.stat().st_size
    with _staging(out) as stage:
        code = stage / "models"
        for rel, text in files.items():
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            (code / rel).write_text(text, encoding="utf-8")
        templates = {t.name[: -len(".in")]: t for t in sorted(TEMPLATE.glob("*.py.in"))}
        for rel, template in templates.items():
            shutil.copyfile(template, code / rel)
        (code / "README.md").write_text(_readme(team, name, spec, files, size), encoding="utf-8")
        found = srmodels_imports(code)
        if found:
            raise RuntimeError(f"the NTIRE package imports srmodels: {'; '.join(found)}")
        missing = _unresolved_imports(code)
        if missing:
            raise RuntimeError(f"the NTIRE package imports modules it lacks: {'; '.join(missing)}")
        zoo = stage / "model_zoo"
        zoo.mkdir()
        shutil.copyfile(file, zoo / ENSEMBLE)
        _publish([(code, code_dir), (zoo, zoo_dir)])
    if size > LINK_ABOVE_BYTES:
        log.warning("%s: %.0f MB; the challenge wants a download link for weights above 100 MB (README.md)",
                    zoo_dir / ENSEMBLE, size / 1e6)
    log.info("%s -> %s (%s), %s", file, code_dir, ", ".join([*templates, *sorted(files)]), zoo_dir / ENSEMBLE)
    return NtireSubmission(code_dir, zoo_dir / ENSEMBLE, package)
