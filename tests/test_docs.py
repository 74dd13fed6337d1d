"""The docs' code is real: docs/writing-a-variant.md runs, and docs/architecture.md quotes the current source.

writing-a-variant.md registers a new variant, so its ```python blocks run in a fresh subprocess (in order, in
one namespace, from the repository root): the variant must not leak into this process's `ll.REGISTRY`, which
other tests iterate. Each block is compiled under the page's path at its own line numbers, so a failure's
traceback points at the line of the page.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lora_lite as ll

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```", re.M | re.S)

# Runs [(first line, code), ...] from stdin, each block at its line in the page, in one shared namespace.
RUNNER = """
import json, sys
path, ns = sys.argv[1], {"__name__": "__main__"}
for line, code in json.load(sys.stdin):
    exec(compile("\\n" * (line - 1) + code, path, "exec"), ns)
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the block's first code line, dedented code) of every ```python block, in page order."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(2)) + 1, textwrap.dedent(m.group(2))) for m in FENCE.finditer(text)]


def test_writing_a_variant_runs_in_a_fresh_process() -> None:
    page = DOCS / "writing-a-variant.md"
    blocks = python_blocks(page)
    assert len(blocks) >= 6, f"expected the page's python blocks, found {len(blocks)}"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(page)],
        input=json.dumps(blocks),
        cwd=ROOT,  # the last block imports tests/test_variants_common.py from the repository root
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{page.name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    assert "scaled_lora" not in ll.REGISTRY  # the page's variant stayed in its own process


def _quoted_in(lines: list[str], source: list[str]) -> bool:
    """Every line of `lines` occurs in `source`, in the same order (the quote may leave lines out)."""
    rest = iter(source)
    return all(any(line == s for s in rest) for line in lines)


def test_architecture_quotes_the_current_source() -> None:
    """The trace in architecture.md quotes runtime.py and variants/lora.py: a changed line must change the page."""
    sources = {p: [s.strip() for s in p.read_text(encoding="utf-8").splitlines()] for p in ROOT.glob("src/**/*.py")}
    blocks = python_blocks(DOCS / "architecture.md")
    assert blocks, "architecture.md has no python block"
    for line, code in blocks:
        quoted = [s.strip() for s in code.splitlines() if s.strip()]
        assert any(_quoted_in(quoted, src) for src in sources.values()), (
            f"docs/architecture.md line {line}: the quoted code is no longer in src/ as written; update the page"
        )
