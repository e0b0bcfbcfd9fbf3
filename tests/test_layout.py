"""The package's layout keeps the promises the README's module map makes: the folders follow the data's way
(model -> io -> runtime -> api -> serve -> tools), a module imports only from its own layer or those below it, no
import cycle exists (imports inside functions included), and no module outgrows one concern (about 500 lines)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import qwen3moe_jax

PACKAGE = Path(qwen3moe_jax.__file__).parent
# Lower layers never import higher ones. errors.py serves every layer; the package's __init__ and __main__ are the
# front door, above everything.
LAYERS = ["errors", "model", "io", "runtime", "api", "serve", "tools", "__init__", "__main__"]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in it (module level or inside functions): `from a.b import c`
    names a.b, or a.b.c where c is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.index(top)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_sits_in_a_layer_folder():
    for name in _modules():
        assert _layer(name) >= 0, name


def test_no_module_imports_from_a_layer_above_its_own():
    wrong = [f"{name} imports {target}" for name, targets in _graph().items() for target in targets
             if _layer(target) > _layer(name)]
    assert not wrong, "\n".join(wrong)


def test_the_engine_knows_nothing_of_the_scheduler_the_server_or_multihost():
    engine = _graph()["qwen3moe_jax.runtime.engine"]
    above = {"qwen3moe_jax.runtime.scheduler", "qwen3moe_jax.runtime.multihost", "qwen3moe_jax.runtime.generation"}
    assert not engine & above, engine & above


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (module -> the modules it imports), as the modules along it, or None: a depth-first
    search for an edge back to a module still open."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_import_cycle():
    """Counting imports inside functions: one import inside a function that closes a loop is a cycle too."""
    cycle = find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from qwen3moe_jax.model import b\n")
    (tmp_path / "b.py").write_text("import qwen3moe_jax.model.c\n")
    (tmp_path / "c.py").write_text("from qwen3moe_jax.model.a import f\n")
    modules = {f"qwen3moe_jax.model.{n}": tmp_path / f"{n}.py" for n in "abc"}
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert find_cycle(graph) == ["qwen3moe_jax.model.a", "qwen3moe_jax.model.b", "qwen3moe_jax.model.c",
                                 "qwen3moe_jax.model.a"]
    del graph["qwen3moe_jax.model.c"]
    assert find_cycle(graph) is None


def _defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_every_import_of_a_package_module_names_what_it_defines():
    """Imports inside functions run only when called: a name moved elsewhere would fail there, late. Every
    `from qwen3moe_jax.X import name`, anywhere in the package, the scripts and the tests, names a submodule of X
    or something X defines."""
    modules = _modules()
    repo = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(repo / "scripts").glob("*.py"), *(repo / "tests").rglob("*.py")]
    wrong = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                defined = _defined_names(modules[node.module])
                wrong += [f"{path.name}: from {node.module} import {alias.name}" for alias in node.names
                          if alias.name not in defined and f"{node.module}.{alias.name}" not in modules]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_importing_the_package_loads_only_what_the_python_api_needs():
    """`import qwen3moe_jax` loads the model, io and runtime layers, not the server or the tools (fastapi, uvicorn
    and the benchmarks load for the commands that use them)."""
    code = ("import sys, qwen3moe_jax\n"
            "print(' '.join(m for m in sys.modules if m.startswith(('qwen3moe_jax.serve', 'qwen3moe_jax.tools', "
            "'fastapi', 'uvicorn'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not loaded, loaded


def test_the_readme_module_map_names_every_module_and_only_modules_that_exist():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## What is inside"):readme.index("Presets in `configs/`")]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {name for cell in first_cells for name in re.findall(r"`([a-z_/]+\.(?:py|cc))`", cell)}
    on_disk = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cc")
               and p.name not in ("__init__.py", "__main__.py")}
    assert named - on_disk == set(), "the map names modules that do not exist"
    assert on_disk - named == set(), "modules missing from the map"
