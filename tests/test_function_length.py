"""No function in src/kiln is over 60 lines unless a `# long:` comment says why (issue 24, item 3).

The scan reads the source with `ast`: a function's length runs from its `def` (decorators left
out) to its last line. The reason goes on the `def` line or the line above it."""

from __future__ import annotations

import ast
from pathlib import Path

from kilntest import ROOT

SOURCE = ROOT / "src" / "kiln"
LIMIT = 60
REASON = "# long:"


def long_functions(source: Path) -> list[str]:
    """`file::function (N lines)` for every function over LIMIT lines without a reason."""
    found = []
    for path in sorted(source.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            def_line, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            if length > LIMIT and REASON not in def_line and not above.strip().startswith(REASON):
                found.append(f"{path.relative_to(source).as_posix()}::{node.name} ({length} lines)")
    return found


def test_the_scan_finds_a_long_function_and_accepts_a_reason(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))  # def + body: LIMIT + 1 lines
    fits = "".join(f"    x{i} = {i}\n" for i in range(LIMIT - 1))
    (tmp_path / "a.py").write_text(f"def too_long():\n{body}\n\ndef short():\n    return 1\n")
    (tmp_path / "b.py").write_text(f"# long: one table, read top to bottom\ndef explained():\n{body}")
    (tmp_path / "c.py").write_text(f"def exactly_the_limit():\n{fits}")
    assert long_functions(tmp_path) == [f"a.py::too_long ({LIMIT + 1} lines)"]


def test_no_function_in_src_is_over_60_lines_without_a_reason() -> None:
    offenders = long_functions(SOURCE)
    assert offenders == [], "\n".join(offenders)
