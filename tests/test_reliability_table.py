"""The README's reliability table is a contract: every promise 1-43 names tests, and every named test exists.

A row cites `dir/file.py::test_name` (or `::other_name` for another test in the same file, or a
whole file); this fails when a promise loses its test or a test is renamed away from its row.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = range(1, 44)  # the promises, numbered as in the README's table
CITE = re.compile(r"`((?:unit|integration|deploy)/[\w/]+\.py)?(?:::(\w+))?`")


def table() -> dict[int, str]:
    """Row number -> the row's test cell, from README's `## Reliability` section."""
    section = (ROOT / "README.md").read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    rows: dict[int, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"\d+(?:[,–-] ?\d+)*", cells[0]):
            continue
        numbers = [int(n) for n in re.findall(r"\d+", cells[0])]
        if "–" in cells[0]:
            numbers = list(range(numbers[0], numbers[-1] + 1))
        for n in numbers:
            rows[n] = cells[-1]
    return rows


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")}


def citations(cell: str) -> list[tuple[str, str | None]]:
    """(file, test or None) per citation; `::name` refers to the file cited before it."""
    out: list[tuple[str, str | None]] = []
    current = ""
    for file, name in CITE.findall(cell):
        current = file or current
        if current:
            out.append((current, name or None))
    return out


def test_every_promise_names_a_test_that_exists() -> None:
    rows = table()
    assert sorted(rows) == list(ROWS), f"rows missing from the table: {sorted(set(ROWS) - set(rows))}"
    for number, cell in rows.items():
        cited = citations(cell)
        assert cited, f"row {number} names no test: {cell}"
        for file, name in cited:
            path = ROOT / "tests" / file
            assert path.is_file(), f"row {number}: {file} does not exist"
            names = defined_tests(path)
            assert names, f"row {number}: {file} holds no test"
            assert name is None or name in names, f"row {number}: {file}::{name} does not exist"
