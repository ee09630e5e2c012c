"""The package's layers import only downward, and no module imports itself back in a cycle.

Layers, lowest first (README, "How agecli is built"):

    root helpers (agecli/*.py) -> data, modeling -> engine -> stages -> recipes -> cli

Every import counts, including those inside functions: a lazy import still ties two
modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agecli"

LAYERS = {"": 0, "data": 1, "modeling": 1, "engine": 2, "stages": 3, "recipes": 4, "cli": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module == "agecli.__main__":  # `python -m agecli`: the command line's entry point
        return LAYERS["cli"]
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").exists()):
        return LAYERS[""]
    return LAYERS[parts[1]]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The agecli modules `path` imports, resolved to modules that exist (not names in them)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != own and name != "agecli":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_layers_import_only_downward():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in import_graph().items() for b in sorted(targets)
              if layer_of(b) > layer_of(a) and not b.startswith(a + ".")]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ importing its own submodules is its public face, not a cycle
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above would pass on an empty graph: show they catch real faults."""
    fake = tmp_path / "agecli"
    (fake / "data").mkdir(parents=True)
    (fake / "stages").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("from agecli.stages.train import fit\n")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("from .b import x\n")
    (fake / "data" / "b.py").write_text("def f():\n    from agecli.data.a import y\n")
    (fake / "stages" / "__init__.py").write_text("")
    (fake / "stages" / "train.py").write_text("import agecli.errors\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = import_graph()
    assert graph["agecli.data.a"] == {"agecli.data.b"} and graph["agecli.data.b"] == {"agecli.data.a"}
    try:
        test_layers_import_only_downward()
    except AssertionError as exc:
        assert "agecli.errors (layer 0) imports agecli.stages.train (layer 3)" in str(exc)
    else:
        raise AssertionError("the upward import errors -> stages.train was not reported")
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "agecli.data.a" in str(exc) and "agecli.data.b" in str(exc)
    else:
        raise AssertionError("the cycle data.a <-> data.b was not reported")
