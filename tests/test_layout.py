"""The layout rules the library keeps so it stays readable in an evening (docs/architecture.md).

- runtime.py at most 300 lines; every other module at most 350, except the command line and its demo (app/);
  each variant file at most 150 lines with a module docstring of at most 25 lines.
- No import cycles between the package's modules (imports inside functions count too; `if TYPE_CHECKING:` ones do not).
- Variants import the contract (variant.py, config.py and what it re-exports), never the runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lora_lite"
MODULES = sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)
# what a variant may import from the package: the contract and the floors below it
CONTRACT = {"variant", "config", "target", "fast", "state", "errors", "guards"}


def _name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports (relative imports resolved; `from . import x` gives the submodule x)."""
    here = _name(path).split(".") if _name(path) else []
    pkg = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports are for annotations only: never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None:
                out.update(f"{mod}.{a.name}".strip(".") for a in node.names)
            else:
                out.add(mod)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out.update(n.removeprefix("lora_lite.") for n in names if n.startswith("lora_lite."))
    known = {_name(p) for p in MODULES}
    return {m for m in out if m in known and m != _name(path)}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_sizes(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    rel = path.relative_to(SRC)
    if rel.parts[0] == "variants" and not path.name.startswith("_"):
        assert lines <= 150, f"{rel}: {lines} lines; a variant file is at most 150 (notes go to docs/variants/)"
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        assert len(doc.splitlines()) <= 25, f"{rel}: docstring of {len(doc.splitlines())} lines (at most 25)"
    elif str(rel) == "runtime.py":
        assert lines <= 300, f"runtime.py: {lines} lines (at most 300)"
    elif rel.parts[0] != "app":  # the command line and its demo
        assert lines <= 350, f"{rel}: {lines} lines (at most 350)"


def test_no_import_cycles() -> None:
    graph = {_name(p): _imports(p) for p in MODULES}
    # the package __init__ and the variants package init import everything (registration): not part of cycles
    graph = {
        m: {d for d in deps if d not in ("", "variants")} for m, deps in graph.items() if m not in ("", "variants")
    }
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for d in sorted(graph.get(m, ())):
            if seen.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if d not in seen:
                visit(d, [*stack, d])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent.name == "variants"], ids=lambda p: p.name)
def test_variants_import_only_the_contract(path: Path) -> None:
    bad = {m for m in _imports(path) if not m.startswith("variants") and m.split(".")[0] not in CONTRACT}
    assert not bad, f"variants/{path.name} imports {sorted(bad)}: a variant imports the contract, never the runtime"
