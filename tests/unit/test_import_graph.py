"""The aggregator's modules import each other without a cycle, and scale-out sits below the
service: the lease, the fence and scale-out never import it, not even for type checking
(every import statement counts, wherever it is in the module)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "aggregator"
BELOW_THE_SERVICE = ("aggregator.scaleout", "aggregator.lease", "aggregator.fence")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from a import b`` counts ``a.b``
    when that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    modules = set(paths)
    return {name: imported(path, name, modules) for name, path in paths.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for n in edges.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_aggregator_modules_import_each_other_without_a_cycle() -> None:
    edges = graph()
    assert "aggregator.service" in edges and "aggregator.scaleout" in edges
    found = cycle(edges)
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_scale_out_the_lease_and_the_fence_do_not_import_the_service() -> None:
    edges = graph()
    for name in BELOW_THE_SERVICE:
        assert name in edges, f"{name} moved: update BELOW_THE_SERVICE"
        assert "aggregator.service" not in reachable(edges, name), (
            f"{name} imports aggregator.service (directly or through another module)"
        )


def test_the_checks_see_an_import_hidden_behind_type_checking(tmp_path: Path) -> None:
    """The checks above could not fail if the graph missed such imports, or cycles."""
    module = tmp_path / "scaleout.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from aggregator.service import AggregatorService\n"
        "    from . import lease\n"
    )
    modules = {"aggregator.service", "aggregator.scaleout", "aggregator.lease"}
    assert imported(module, "aggregator.scaleout", modules) == {
        "aggregator.service",
        "aggregator.lease",
    }
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert reachable({"a": {"b"}, "b": {"c"}}, "a") == {"b", "c"}
