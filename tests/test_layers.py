"""The package layering of srmodels (``srmodels.LAYERS``): no import runs the wrong way, lazy ones included."""
from __future__ import annotations

import ast
from pathlib import Path

import srmodels

PACKAGE = Path(srmodels.__file__).resolve().parent
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py"}  # the command line sits on top of every package
MODULES: set[str] = set()  # top-level modules that have a layer of their own


def imported_packages(source: str) -> set[str]:
    """The srmodels packages a module's source imports, at any depth of the file (absolute imports only)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"relative import 'from {'.' * node.level}{node.module or ''}': write it absolute "
                                 "so the layer it reaches is visible")
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "srmodels" and len(parts) > 1:
                found.add(parts[1])
            elif parts == ["srmodels"] and isinstance(node, ast.ImportFrom):
                found.update(a.name for a in node.names)
    return found


def violations(package: str, source: str) -> set[str]:
    """Packages ``source`` (a module of ``package``) imports although LAYERS does not allow them."""
    allowed = set(srmodels.LAYERS[package]) | {package}
    return {p for p in imported_packages(source) if p not in allowed and p in srmodels.LAYERS | {"cli": ()}}


def test_every_package_has_a_layer_and_says_what_it_holds():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages | {Path(m).stem for m in MODULES} == set(srmodels.LAYERS)
    loose = {p.name for p in PACKAGE.glob("*.py")} - TOP_LEVEL - MODULES
    assert not loose, f"modules outside any package: {sorted(loose)}"
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "May import:" in doc, f"srmodels/{name}/__init__.py: say what it holds and may import"


def test_layers_are_acyclic():
    order: list[str] = []
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"cycle: {' -> '.join(path + (name,))}"
        for dep in srmodels.LAYERS[name]:
            visit(dep, path + (name,))
        if name not in order:
            order.append(name)
    for name in srmodels.LAYERS:
        visit(name, ())
    assert order[0] in ("core", "archs", "metrics")


def test_no_import_runs_the_wrong_way():
    wrong = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() in TOP_LEVEL:
            continue
        bad = violations(rel.parts[0] if len(rel.parts) > 1 else path.stem, path.read_text())
        if bad:
            wrong[rel.as_posix()] = sorted(bad)
    assert not wrong, f"imports against srmodels.LAYERS: {wrong}"


def test_the_check_sees_a_wrong_import_even_inside_a_function():
    source = "def f():\n    from srmodels.evaluation.report import sets_table\n    return sets_table\n"
    assert violations("core", source) == {"evaluation"}
    assert violations("evaluation", source) == set()
    assert violations("training", "import srmodels.interop.export\n") == {"interop"}
    assert violations("data", "from srmodels import cli\n") == {"cli"}
    assert violations("models", "from srmodels import tracking\n") == {"tracking"}
