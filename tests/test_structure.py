"""The package's structure, read from its source (an AST walk of every import, at any depth, lazy
ones inside functions included; ``if TYPE_CHECKING:`` blocks excluded): no import cycle, and the
layering rules of docs/architecture.md ("Layers")."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sharnn_fast"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(module: str, tree: ast.AST):
    """Every dotted name the module imports (absolute), including ``from X import y`` as X.y."""
    is_package = MODULES[module].name == "__init__.py"
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # `from . import loop` imports the module loop, not the package
                yield f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name that is not a module counts as its
    module: ``from .backend import explain`` is an edge to sharnn_fast.backend). Importing a
    module also runs its parents' __init__, which is not counted: sharnn_fast/__init__.py imports
    nothing at import time (PEP 562), and the ops packages' __init__ are the ops themselves."""
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for name in _imported_names(module, ast.parse(path.read_text(), str(path))):
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name != "sharnn_fast":
                edges.add(name)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _reaches(start: str, graph=GRAPH) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that lies on a cycle."""
    found = {}
    for start in graph:
        paths, seen = {start: [start]}, {start}
        queue = [start]
        while queue and start not in found:
            current = queue.pop(0)
            for nxt in sorted(graph[current]):
                if nxt == start:
                    found[start] = paths[current] + [start]
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths[nxt] = paths[current] + [nxt]
                    queue.append(nxt)
    unique = {}
    for cycle in found.values():
        unique.setdefault(frozenset(cycle), cycle)
    return list(unique.values())


def test_the_walk_sees_the_imports():
    """The test's own check: known edges are found (a walk that saw nothing would pass anything)."""
    assert "sharnn_fast.backend" in GRAPH["sharnn_fast.ops.lstm"]
    assert "sharnn_fast.ops.lstm" in _reaches("sharnn_fast.model")
    assert "sharnn_fast.training.loop" in _reaches("sharnn_fast.cli")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def _modules_under(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


@pytest.mark.parametrize("module", _modules_under("sharnn_fast.ops"))
def test_ops_never_import_the_model_training_or_the_command_line(module):
    above = {"sharnn_fast.model", "sharnn_fast.generation", "sharnn_fast.cli", "sharnn_fast.__main__",
             *_modules_under("sharnn_fast.training")}
    assert not (_reaches(module) & above), sorted(_reaches(module) & above)


@pytest.mark.parametrize("module", ["sharnn_fast.model", "sharnn_fast.generation"])
def test_the_model_never_imports_training_or_the_command_line(module):
    above = {"sharnn_fast.cli", "sharnn_fast.__main__", *_modules_under("sharnn_fast.training")}
    assert not (_reaches(module) & above), sorted(_reaches(module) & above)


def _implementation(module: str):
    """The backend a module of ops/<op>/ implements ("reference", "torch", "triton", "cuda"), or None
    for the op's public function and for what implementations share (materialised.py, ...)."""
    parts = module.split(".")
    if len(parts) != 4 or parts[1] != "ops":
        return None
    name = parts[3]
    for prefix, backend in (("reference", "reference"), ("torch_native", "torch"), ("triton", "triton"),
                            ("cuda", "cuda")):
        if name == prefix or name.startswith(prefix + "_"):
            return backend
    return None


def test_the_implementations_are_recognised():
    found = {_implementation(m) for m in MODULES} - {None}
    assert found == {"reference", "torch", "triton", "cuda"}, found


@pytest.mark.parametrize("module", [m for m in MODULES if _implementation(m)])
def test_no_implementation_imports_another(module):
    mine = _implementation(module)
    others = {m for m in GRAPH[module] if _implementation(m) not in (None, mine)}
    assert not others, f"{module} ({mine}) imports {sorted(others)}"


def test_heavy_imports_wait_until_used():
    """``import sharnn_fast`` (and its ops, the model and the command line's module) loads none of
    triton, torch._dynamo, matplotlib and tqdm that ``import torch`` itself did not load."""
    code = ("import sys, torch\n"
            "heavy = ('triton', 'torch._dynamo', 'matplotlib', 'tqdm')\n"
            "before = {m for m in heavy if m in sys.modules}\n"
            "import sharnn_fast, sharnn_fast.cli, sharnn_fast.ops, sharnn_fast.model\n"
            "print(sorted(m for m in heavy if m in sys.modules and m not in before))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
