"""The package's import graph: no cycles, and nothing imports a layer above its own.

The graph is read with :mod:`ast` from every ``.py`` file under ``pagedserve/`` (nothing is
imported, so the test takes milliseconds and needs neither torch nor triton). An edge A -> B is an
``import``/``from ... import`` in A that names module B (``from pagedserve.loader import gguf``
names ``pagedserve.loader.gguf``; ``from pagedserve.loader import load_model`` names
``pagedserve.loader``).

Which imports count:

- Top-level and function-level (lazy) imports both count, for cycles and for layers. A lazy
  import is how most of our cycles hid: ``attention.select_backend`` imported
  ``attention_triton`` inside the function, and ``attention_triton`` imported ``attention`` at
  the top. Deferring an import changes when a module loads, not what depends on what.
- Imports under ``if TYPE_CHECKING:`` count for layers (a module that names a type from a layer
  above knows about that layer) but not for cycles: they never run, and two value types that
  name each other in annotations (a ``Request`` holds its ``GrammarState``, the grammar waiting
  room lists ``Request``s) are one concept split for size, not a loop in the load order.
- A submodule's implicit load of its parent package's ``__init__`` is not an edge: Python does
  it for every submodule, whatever the code says.

Layers, from the top (an import may go sideways or down, never up):

- entry points: ``pagedserve.cli`` and ``pagedserve.__main__``; nothing else imports them;
- applications: ``pagedserve.server`` and ``pagedserve.bench``; only entry points import them,
  and they do not import each other;
- the library: everything else.

Within the library, its packages are layers too (``LIBRARY_LAYERS``, from the bottom: ``core``,
``ops``, ``parallel``, ``models``, ``loader``, ``worker``, ``engine``; each imports only those
below it, and the modules at the package's root, value objects and services, sit beside them),
and two seams are checked as well:

- a backend imports its base, never the reverse: ``attention`` and ``fused_ops`` define an
  interface and its torch reference, ``attention_triton`` and ``fused_ops_triton`` implement it,
  and only ``backends`` (which picks one at start-up) imports a Triton backend;
- the control plane (scheduler, KV managers, requests) imports only the value objects it deals
  in, so it stays integers-only and its tests need no model.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

ENTRY_POINTS = ("pagedserve.cli", "pagedserve.__main__")
APPLICATIONS = ("pagedserve.server", "pagedserve.bench")
BACKENDS = {  # base -> the modules that implement its interface
    "pagedserve.ops.attention": ("pagedserve.ops.attention_triton",),
    "pagedserve.ops.fused_ops": ("pagedserve.ops.fused_ops_triton",),
}
BACKEND_SELECTOR = "pagedserve.ops.backends"
LIBRARY_LAYERS = (  # the library's packages from the bottom: each imports only those before it
    "pagedserve.core", "pagedserve.ops", "pagedserve.parallel", "pagedserve.models",
    "pagedserve.loader", "pagedserve.worker", "pagedserve.engine")
CONTROL_PLANE = ("pagedserve.core",)
CONTROL_PLANE_MAY_IMPORT = CONTROL_PLANE + (
    "pagedserve.outputs", "pagedserve.sampling_params", "pagedserve.config",
    "pagedserve.structured.state",  # annotation only: a request's grammar
)


@dataclass(slots=True)
class ImportGraph:
    modules: set[str]
    runtime: dict[str, set[str]] = field(default_factory=dict)  # top-level and lazy imports
    typing_only: dict[str, set[str]] = field(default_factory=dict)  # under TYPE_CHECKING

    def all_edges(self) -> dict[str, set[str]]:
        return {m: self.runtime.get(m, set()) | self.typing_only.get(m, set())
                for m in self.modules}


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _owner(name: str, modules: set[str]) -> str | None:
    """The module a dotted name lives in (``pagedserve.loader.load_model`` -> the package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package this module is in
        package_parts = module.split(".") if is_package else module.split(".")[:-1]
        package_parts = package_parts[:len(package_parts) - node.level + 1]
        base = ".".join(package_parts + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names]


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str], package: str,
             ) -> tuple[set[str], set[str]]:
    """(runtime, typing-only) modules of `package` that `module` imports."""
    runtime: set[str] = set()
    typing_only: set[str] = set()

    def visit(node: ast.AST, under_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_statement(stmt, True)
                for stmt in child.orelse:
                    visit_statement(stmt, under_type_checking)
            else:
                visit_statement(child, under_type_checking)

    def visit_statement(node: ast.AST, under_type_checking: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in _targets(node, module, is_package, modules):
                target = _owner(name, modules) if name.startswith(package) else None
                if target is not None and target != module:
                    (typing_only if under_type_checking else runtime).add(target)
        visit(node, under_type_checking)

    visit(tree, False)
    return runtime, typing_only


def import_graph(root: Path, package: str = "pagedserve") -> ImportGraph:
    """Every module of `package` under `root` and the modules of `package` each one imports."""
    files = {_module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    graph = ImportGraph(modules={name for name, _ in files})
    for (module, is_package), path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph.runtime[module], graph.typing_only[module] = _imports(
            tree, module, is_package, graph.modules, package)
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(found)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> int:
    """2: entry points, 1: applications, 0: the library."""
    return 2 if _within(module, ENTRY_POINTS) else 1 if _within(module, APPLICATIONS) else 0


def library_layer(module: str) -> int | None:
    """The rank of `module`'s package in LIBRARY_LAYERS; None for the modules beside them."""
    return next((i for i, p in enumerate(LIBRARY_LAYERS) if _within(module, (p,))), None)


def _application(module: str) -> str | None:
    return next((p for p in APPLICATIONS if _within(module, (p,))), None)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every edge that breaks the layers or the seams of the module docstring, as "A -> B: why"."""
    backends = {b: base for base, impls in BACKENDS.items() for b in impls}
    found = []
    for source in sorted(edges):
        for target in sorted(edges[source]):
            why = None
            if layer(target) > layer(source):
                why = "imports a layer above its own"
            elif (layer(source) == layer(target) == 1
                  and _application(source) != _application(target)):
                why = "one application imports another"
            elif (library_layer(source) is not None and library_layer(target) is not None
                  and library_layer(target) > library_layer(source)):
                why = "imports a package above its own"
            elif target in backends and source not in (BACKEND_SELECTOR, *backends):
                why = f"only {BACKEND_SELECTOR} imports a backend of {backends[target]}"
            elif (_within(source, CONTROL_PLANE)
                  and not _within(target, CONTROL_PLANE_MAY_IMPORT)):
                why = "the control plane imports beyond its value objects"
            if why:
                found.append(f"{source} -> {target}: {why}")
    return found


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return import_graph(PACKAGE_ROOT)


def test_the_walker_sees_the_package(graph):
    assert {"pagedserve.core.scheduler", "pagedserve.loader", "pagedserve.loader.gguf",
            "pagedserve.cli.serve", "pagedserve.ops.backends"} <= graph.modules
    # a top-level import, a lazy one inside a function, and one under TYPE_CHECKING
    assert "pagedserve.core.request" in graph.runtime["pagedserve.core.scheduler"]
    assert "pagedserve.ops.attention_triton" in graph.runtime[BACKEND_SELECTOR]
    assert "pagedserve.structured.state" in graph.typing_only["pagedserve.core.request"]
    # `from pagedserve.loader import checks` names the submodule, not the package
    assert "pagedserve.loader.checks" in graph.runtime["pagedserve.loader.gguf"]


def test_no_import_cycles(graph):
    assert cycles(graph.runtime) == []


def test_no_upward_imports(graph):
    assert upward_imports(graph.all_edges()) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checks_fail_on_a_cycle_and_on_upward_imports(tmp_path):
    """The rules above against a small package built to break each of them once."""
    _write(tmp_path, {
        "pagedserve/__init__.py": "",
        "pagedserve/ops/attention.py": "def select():\n    from pagedserve.ops import attention_triton\n",
        "pagedserve/ops/attention_triton.py": "from pagedserve.ops.attention import select\n",
        "pagedserve/core/scheduler.py": "from pagedserve.core.request import Request\n"
                                        "from pagedserve.tokenizer import Tokenizer\n",
        "pagedserve/core/request.py": "from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n"
                                      "    from pagedserve.core.scheduler import X\n",
        "pagedserve/tokenizer.py": "",
        "pagedserve/ops/fused_ops.py": "from pagedserve.worker.model_runner import ModelRunner\n",
        "pagedserve/worker/model_runner.py": "",
        "pagedserve/cli/__init__.py": "",
        "pagedserve/cli/options.py": "",
        "pagedserve/bench/__init__.py": "",
        "pagedserve/bench/offline.py": "from ..cli.options import parse_bytes\n"
                                       "from pagedserve.server import app\n",
        "pagedserve/server/__init__.py": "",
        "pagedserve/server/app.py": "",
    })
    graph = import_graph(tmp_path)
    # the lazy import closes a cycle; the one under TYPE_CHECKING does not
    assert cycles(graph.runtime) == [
        ["pagedserve.ops.attention", "pagedserve.ops.attention_triton"]]
    assert cycles(graph.all_edges()) == [
        ["pagedserve.core.request", "pagedserve.core.scheduler"],
        ["pagedserve.ops.attention", "pagedserve.ops.attention_triton"]]
    assert upward_imports(graph.all_edges()) == [
        "pagedserve.bench.offline -> pagedserve.cli.options: imports a layer above its own",
        "pagedserve.bench.offline -> pagedserve.server.app: one application imports another",
        "pagedserve.core.scheduler -> pagedserve.tokenizer: the control plane imports beyond its "
        "value objects",
        "pagedserve.ops.attention -> pagedserve.ops.attention_triton: only "
        "pagedserve.ops.backends imports a backend of pagedserve.ops.attention",
        "pagedserve.ops.fused_ops -> pagedserve.worker.model_runner: imports a package above "
        "its own",
    ]
