"""The package's shape: no module imports, however indirectly, a module that imports it back (imports inside
functions and under TYPE_CHECKING count too: a lazy import that closes a circle is still a circle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "overfill"


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the overfill modules it imports (a package's own __init__ re-exporting its modules is not an edge)."""
    modules = {module_of(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:  # 'overfill.bench.run.x' -> 'overfill.bench.run'
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("overfill"):
                found |= {owner(f"{node.module}.{a.name}") for a in node.names} | {owner(node.module)}
            elif isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.startswith("overfill")}
        package_init = path.name == "__init__.py"
        graph[name] = {m for m in found if m and m != name and not (package_init and m.startswith(name + "."))}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert {"overfill.generation", "overfill.sampling", "overfill.bench.run"} <= set(graph)  # the walk saw the package
    assert "overfill.sampling" in graph["overfill.generation"]
    assert circles(graph) == [], "modules that import each other, directly or through others"


@pytest.mark.parametrize("lower, upper", [("overfill.modeling", "overfill.refresh"), ("overfill.demo.run", "overfill.cli"),
                                          ("overfill.bench.config", "overfill.vllm")])
def test_stages_do_not_import_what_is_built_on_them(lower, upper):
    graph = import_graph()
    assert not any(m == upper or m.startswith(upper + ".") for m in graph[lower])
