"""The package's imports point down: no module imports one that (directly or through
others) imports it back, lazy imports inside functions included (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import mlaan_func

ROOT = Path(mlaan_func.__file__).parent


def module_name(path: Path) -> str:
    parts = ["mlaan_func", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mlaan_func module ``path`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlaan_func")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mlaan_func"):
                continue
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            found |= submodules
            if len(submodules) < len(node.names):  # some names come from the package itself
                found.add(target)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in colour:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if n not in colour:
            found = visit(n)
            if found:
                return found
    return None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # A package's __init__ re-exports what is below it: importing a submodule runs its parent
    # package first, so edges *into* a parent package from its own children are cycles too,
    # but the top-level package's flat API is the one place allowed to import everything.
    return {n: imports_of(n, p, known) - {"mlaan_func"} for n, p in mods.items()}


def test_find_cycle_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_parser_sees_lazy_imports(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("def f():\n    from .core import net, Net\n    from .train import step\n")
    known = set(modules())
    assert imports_of("mlaan_func.fake", source, known) == {"mlaan_func.core", "mlaan_func.core.net",
                                                            "mlaan_func.train.step"}
    assert "mlaan_func.core.net" in import_graph()["mlaan_func.combinators"]
