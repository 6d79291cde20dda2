"""The package's layering, checked from its source: every tu_lib import points down (or within its own layer), no
two modules import each other in a cycle, no stage imports another stage (stages meet only through files), and
notebooks import stages and the few public entry points only."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tu_lib"
# bottom to top; a module may import its own layer and the layers below
LAYERS = ["core", "render", "data", "models", "training", "methods", "judges", "evaluation", "analysis", "stages"]
# what notebooks may import besides stages: the model loader and the parameter and figure helpers every notebook uses
NOTEBOOK_ENTRY_POINTS = {"tu_lib.models", "tu_lib.core.params", "tu_lib.core.plots", "tu_lib.stages"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The tu_lib modules an import statement loads (a `from package import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "tu_lib"]
    if node.level:
        is_package = MODULES[importer].name == "__init__.py"
        base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "tu_lib":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def imports_of(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # module level and inside functions alike
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(resolve(name, node))
    return {m for m in found if m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer():
    loose = [m for m in MODULES if m != "tu_lib" and layer(m) is None]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_import_points_upward():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                    if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_stages_meet_only_through_files():
    crossing = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                      if a.startswith("tu_lib.stages.") and b.startswith("tu_lib.stages.") and b != "tu_lib.stages")
    assert not crossing, "stage modules importing each other (share the code through a lower layer):\n" + "\n".join(crossing)


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_import_stages_and_entry_points_only(notebook):
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    used = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tu_lib"):
                used.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names)
    wrong = sorted(m for m in used if not any(m == e or m.startswith(e + ".") for e in NOTEBOOK_ENTRY_POINTS))
    assert not wrong, f"{notebook.name} imports {wrong}; notebooks call stages (tu_lib.stages.*) and {sorted(NOTEBOOK_ENTRY_POINTS)}"


def test_the_check_sees_a_real_violation(tmp_path):
    """The checks above are only worth something if they can fail: an upward and a cyclic import are caught."""
    tree = ast.parse("from ..stages import evaluate\nfrom . import files\n")
    found = set()
    for node in tree.body:
        found.update(resolve("tu_lib.core.paths", node))
    assert "tu_lib.stages.evaluate" in found and layer("tu_lib.stages.evaluate") > layer("tu_lib.core.paths")
    assert "tu_lib.core.files" in found


def test_no_module_or_function_is_overgrown():
    """Readable units: modules under ~600 lines, functions under ~80 (the review's bars)."""
    long_modules = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    long_functions = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{m}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_modules and not long_functions, f"modules: {long_modules}; functions: {long_functions}"
