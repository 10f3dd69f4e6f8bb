"""dvc.yaml lists, for every stage, its script and every srmodels module the script imports (transitively),
as the file, its package's folder, or (srmodels/archs/__init__.py) the params entry of the stage's architecture.

A module missing from a stage's deps means `dvc repro` would keep a stale output after that module changed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT

def srmodels_imports(path: Path, seen: set[str] | None = None) -> set[str]:
    """Repo-relative paths of the srmodels modules ``path`` imports at module level, followed transitively.

    Imports inside functions are deliberately lazy (params' variant check, MLflow tracking) and are not followed;
    a backbone's own architecture is imported by name (srmodels.archs) and is checked apart.
    """
    seen = set() if seen is None else seen
    tree = ast.parse(path.read_text())
    package = path.parent.relative_to(ROOT).as_posix().replace("/", ".") if path.is_relative_to(ROOT / "srmodels") else ""
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif node.module and node.module.startswith("srmodels"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("srmodels")]
        for name in names:
            rel = Path(*name.split("."))
            for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
                key = candidate.relative_to(ROOT).as_posix()
                if candidate.is_file() and key not in seen:
                    seen.add(key)
                    srmodels_imports(candidate, seen)
    return seen


def covered(module: str, deps: list[str]) -> bool:
    return any(module == d or module.startswith(d.rstrip("/") + "/") for d in deps)


def stages() -> list[tuple[str, str, list[str]]]:
    """(stage, script, deps) of every stage; a params file the stage reads keys of counts as a dependency."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2]  # python -m stages.<name> ...
        script = module.replace(".", "/") + ".py"
        files = [f for p in body.get("params", []) if isinstance(p, dict) for f in p]
        out.append((name, script, [d for d in body["deps"] if isinstance(d, str)] + files))
    return out


@pytest.mark.parametrize("name,script,deps", stages(), ids=[s[0] for s in stages()])
def test_stage_deps_cover_imports(name, script, deps):
    assert script in deps and "stages/_common.py" in deps
    needed = srmodels_imports(ROOT / script) | srmodels_imports(ROOT / "stages" / "_common.py")
    needed.discard("srmodels/__init__.py")
    missing = sorted(m for m in needed if not covered(m, deps))
    assert not missing, f"{name}: dvc.yaml deps miss {missing}"


def test_import_walk_sees_the_backbones():
    found = srmodels_imports(ROOT / "stages" / "finetune.py")
    assert {"srmodels/training/loop.py", "srmodels/models/model.py", "srmodels/archs/__init__.py",
            "srmodels/archs/_layers.py"} <= found


def test_backbone_stages_depend_on_their_own_architecture():
    """The architecture a backbone stage builds is imported by name, which the import walk cannot see."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("finetune", "cache"):
        body = spec[name]["do"]
        assert spec[name]["foreach"] == "${trained}"
        assert "srmodels/archs/${item}.py" in body["deps"], name
        assert {"srmodels/archs/__init__.py": ["ARCHS.${item}"]} in body["params"], name
        assert "srmodels/archs" not in body["deps"], f"{name}: a new architecture file would re-run it"
