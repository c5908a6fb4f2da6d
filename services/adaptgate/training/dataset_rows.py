"""Reading an uploaded file into raw rows (line number + fields), before any label checks.

Line numbers are the file's own (1-based; the CSV header is line 1), so a user can jump to
them in an editor. Blank lines are skipped and remembered for a warning.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

from adaptgate.errors import InvalidDataset
from adaptgate.training.problems import Problems

FORMATS = ("jsonl", "csv")


@dataclass
class RawRow:
    line: int
    fields: dict[str, object]


@dataclass
class RawRows:
    rows: list[RawRow] = field(default_factory=list)
    blank_lines: list[int] = field(default_factory=list)


def decode_utf8(data: bytes) -> str:
    """UTF-8 (a BOM is allowed); anything else is refused with the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidDataset(
            f"dataset is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} cannot be decoded"
        ) from None


def read_jsonl(text: str, problems: Problems) -> RawRows:
    out = RawRows()
    # Split on newlines only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            out.blank_lines.append(number)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add("invalid JSON", number, f"line {number}: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(value, dict):
            problems.add("not a JSON object", number, f"line {number} holds a {type(value).__name__}")
            continue
        out.rows.append(RawRow(number, value))
    return out


def _csv_header(reader: "csv._reader", required: tuple[str, ...]) -> list[str]:
    header = next(reader, None)
    if header is None:
        raise InvalidDataset("dataset is empty: no header row and no data rows")
    missing = [name for name in required if name not in header]
    if missing:
        columns = ", ".join(repr(h) for h in header)
        names = ", ".join(repr(m) for m in missing)
        raise InvalidDataset(f"CSV header has no {names} column; its columns are: {columns} (set text_field/label_field)")
    return header


def read_csv(text: str, required: tuple[str, ...]) -> RawRows:
    """A header row, then one record per row; quoted fields may span lines."""
    out = RawRows()
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = _csv_header(reader, required)
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                out.blank_lines.append(reader.line_num)
                continue
            out.rows.append(RawRow(reader.line_num, dict(zip(header, cells, strict=False))))
    except csv.Error as exc:
        raise InvalidDataset(f"CSV is malformed on line {reader.line_num}: {exc}") from None
    return out


def interior_blank_lines(raw: RawRows) -> list[int]:
    """Blank lines between rows (a trailing newline or two is normal and not worth a warning)."""
    last = raw.rows[-1].line if raw.rows else 0
    return [n for n in raw.blank_lines if n < last]
