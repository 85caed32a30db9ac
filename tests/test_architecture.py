"""The package's shape: imports only go down (tools -> integration -> engine; tiny/ below tools and integration),
no module imports itself round a cycle, and ARCHITECTURE.md names every module.

Imports are read from the source (module level and inside functions alike), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dit_sparse"

#: each concern and the concerns it may import (its own included); the engine is everything else in the package
MAY_IMPORT = {
    "engine": {"engine"},
    "tiny": {"tiny"},
    "integration": {"integration", "engine", "tiny"},
    "tools": {"tools", "integration", "engine", "tiny"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("tiny", "integration", "tools") else "engine"


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` imports (``from x import name`` counts as module ``x.name`` when that
    is a module, else ``x``)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and target.startswith("dit_sparse"):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) - {"dit_sparse"} for m, p in known.items()}


def test_imports_only_go_down():
    wrong = [f"{m} ({concern(m)}) imports {t} ({concern(t)})"
             for m, targets in graph().items() for t in sorted(targets)
             if concern(t) not in MAY_IMPORT[concern(m)]]
    assert not wrong, "imports going up:\n" + "\n".join(wrong)


def test_production_backends_do_not_import_the_oracle():
    wrong = [m for m, targets in graph().items()
             if m.startswith("dit_sparse.backends") and m != "dit_sparse.backends.torch_ref"
             and any(t.startswith("dit_sparse.reference") for t in targets)]
    assert not wrong, f"{wrong} import dit_sparse.reference (the test oracle); only the torch backend may"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert not cycles(graph()), f"import cycles: {cycles(graph())}"


def test_the_checks_can_fail():
    """The cycle finder and the concern rule see a planted cycle and a planted upward import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "tools" not in MAY_IMPORT[concern("dit_sparse.integration.apply")]
    assert concern("dit_sparse.methods.engine") == "engine" and concern("dit_sparse.tiny.model") == "tiny"


def test_architecture_names_every_module():
    """Each module has its line, as `path` relative to the package (a package's __init__ may go by `folder/`)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()

    def named(p: Path) -> bool:
        rel = p.relative_to(PACKAGE)
        return f"`{rel}`" in text or (p.name == "__init__.py" and f"`{rel.parent}/`" in text)

    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py")) if not named(p)]
    assert not missing, f"ARCHITECTURE.md has no line for: {missing}"
