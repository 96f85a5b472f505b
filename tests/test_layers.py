"""The layer rule of pyproject.toml's ``[tool.esrdf.layers]``, checked over the source of every module.

import-linter does not fit this project: its graph builder (grimp) walks the folder of the top-level
package only, and ``esrdf.export``, ``esrdf.engines`` and ``esrdf.runtime`` live in other folders
(``[tool.setuptools] package-dir``), so it would see none of them. This test reads that same mapping, parses
each file with ``ast`` (nothing is imported, so it runs in a second and needs no torch), and checks:

- every import, at module level or inside a function, runs down the layers (declared inversions aside);
- the runtime imports no torch, TensorRT or ONNX, and of the model package only its torch-free modules;
- no module-level import circle (imports under ``if TYPE_CHECKING:`` and inside functions do not run at
  import time and are left out of this one).
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RULE = CONFIG["tool"]["esrdf"]["layers"]


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module name: an esrdf module, or an external one (its full dotted name)
    file: str
    line: int
    lazy: bool  # inside a function: runs when called, not at import time
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py under the folders ``package-dir`` maps (longest folder wins)."""
    mapping = CONFIG["tool"]["setuptools"]["package-dir"]
    folders = sorted(((ROOT / f).resolve(), name) for name, f in mapping.items())
    modules: dict[str, Path] = {}
    for folder, name in folders:
        for file in folder.rglob("*.py"):
            owner = max((f for f, _n in folders if file.is_relative_to(f)), key=lambda f: len(f.parts))
            if owner != folder:
                continue
            parts = [name, *file.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, source: str, file: str, known: set[str]) -> list[Import]:
    """Every import in ``source``: ``import``, ``from ... import`` and ``importlib.import_module("...")``."""
    found: list[Import] = []
    package = module if file.endswith("__init__.py") else module.rpartition(".")[0]

    def add(target: str, node: ast.AST, lazy: bool, type_only: bool) -> None:
        found.append(Import(module, target, file, getattr(node, "lineno", 0), lazy, type_only))

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node, lazy, type_only)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                add(str(node.args[0].value), node, True, type_only)
        inner_lazy = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, inner_lazy, True)
            for child in node.orelse:
                visit(child, inner_lazy, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner_lazy, type_only)

    visit(ast.parse(source, filename=file), False, False)
    return found


def scan() -> tuple[set[str], list[Import]]:
    files = module_files()
    known = set(files)
    found = []
    for module, file in sorted(files.items()):
        rel = str(file.relative_to(ROOT))
        found += imports_of(module, file.read_text(encoding="utf-8"), rel, known)
    return known, found


def layer(module: str) -> int:
    """Index in ``order`` (0 = top) of the longest layer name ``module`` starts with."""
    names = [n for n in RULE["order"] if module == n or module.startswith(n + ".")]
    return RULE["order"].index(max(names, key=len))


def _under(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for i in imports:
        if not _under(i.target, ["esrdf"]) or layer(i.target) >= layer(i.importer):
            continue
        if i.lazy and _under(i.target, RULE["inverted"].get(i.importer, [])):
            continue  # a declared inversion, inside a function
        bad.append(
            f"{i.file}:{i.line}: {i.importer} (layer {RULE['order'][layer(i.importer)]}) imports "
            f"{i.target} (layer {RULE['order'][layer(i.target)]}, above it)"
        )
    return list(dict.fromkeys(bad))  # one line per import statement, however many names it imports


def torch_free_violations(imports: list[Import]) -> list[str]:
    rule = RULE["torch_free"]
    bad = []
    for i in imports:
        if not _under(i.importer, rule["importers"]):
            continue
        if _under(i.target, rule["forbidden"]):
            bad.append(
                f"{i.file}:{i.line}: {i.importer} imports {i.target}, which the lean runtime never loads"
            )
        elif (
            _under(i.target, ["esrdf"])
            and layer(i.target) == RULE["order"].index("esrdf")
            and (i.target not in rule["model_modules"])
        ):
            bad.append(f"{i.file}:{i.line}: {i.importer} imports {i.target}, not a torch-free model module")
    return list(dict.fromkeys(bad))


def import_time_circles(imports: list[Import], known: set[str]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of the module-level graph, of more than one module or a
    module importing itself."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in imports:
        if not i.lazy and not i.type_only and i.target in known:
            graph[i.importer].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return circles


def test_the_scan_sees_every_layer() -> None:
    known, imports = scan()
    layers = ("config", "runtime.driver", "runtime.serving.serve", "engines.torch_engine", "export.cli")
    assert {f"esrdf.{m}" for m in layers} <= known
    assert {RULE["order"][layer(m)] for m in known} == set(RULE["order"])
    assert any(i.importer == "esrdf.runtime.backends" and i.lazy for i in imports)


def test_every_import_runs_down_the_layers() -> None:
    _known, imports = scan()
    assert layer_violations(imports) == []


def test_the_runtime_imports_no_torch_and_only_torch_free_model_modules() -> None:
    _known, imports = scan()
    assert torch_free_violations(imports) == []


def test_no_module_level_import_circles() -> None:
    known, imports = scan()
    assert import_time_circles(imports, known) == []


def test_the_checks_catch_an_upward_import_an_inversion_at_import_time_and_a_circle() -> None:
    """Guard against vacuous checks: each rule flags a violation planted in real modules' imports."""
    known, imports = scan()
    upward = imports_of("esrdf.runtime.driver", "from esrdf.export.parity import compare\n", "d.py", known)
    assert layer_violations(upward) == [
        "d.py:1: esrdf.runtime.driver (layer esrdf.runtime) imports esrdf.export.parity (layer esrdf.export, "
        "above it)"
    ]
    eager_inversion = imports_of(
        "esrdf.runtime.backends", "import esrdf.engines.torch_engine\n", "b.py", known
    )
    assert len(layer_violations(eager_inversion)) == 1  # the declared inversion holds inside functions only
    model = imports_of("esrdf.runtime.cli", "def f():\n    from esrdf.checkpoint import load_checkpoint\n",
                       "c.py", known)  # fmt: skip
    assert len(torch_free_violations(model)) == 1
    back = imports_of(
        "esrdf.runtime.sampling", "from esrdf.runtime.driver import fixed_shape\n", "s.py", known
    )
    circles = import_time_circles(imports + back, known)
    assert any({"esrdf.runtime.driver", "esrdf.runtime.sampling"} <= set(c) for c in circles)
