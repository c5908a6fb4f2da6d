"""Reading an uploaded file into raw rows (line number + fields), one row at a time.

The file is read incrementally from a binary handle: no reader ever holds the whole upload as
one string or keeps more than the row it is on, so a large upload costs memory in proportion
to the texts and labels the dataset keeps, not to the file. Every line is bounded
(MAX_LINE_BYTES) and so is the number of rows (MAX_ROWS), each refusal naming the line.

Line numbers are the file's own (1-based; the CSV header is line 1), so a user can jump to
them in an editor. Blank lines are skipped and remembered for a warning.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from adaptgate.errors import InvalidDataset
from adaptgate.training.data.problems import MAX_LISTED, Problems

# A text is a sentence or a document, never a megabyte: a longer line is a wrong file (or a
# hostile one) and would otherwise be held whole in memory before any check could look at it.
MAX_LINE_BYTES = 1 << 20
# One million rows trains any classifier this service fits; more is refused before it fills memory.
MAX_ROWS = 1_000_000
# Decoding UTF-8 with surrogateescape turns each undecodable byte into one of these code points,
# so the line that holds a bad byte is known exactly even though decoding happens in chunks.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


@dataclass
class RawRow:
    line: int
    fields: dict[str, object]


@dataclass
class BlankLines:
    """Blank lines between rows, in constant memory: a count and the first few line numbers.

    Blanks after the last row (a trailing newline or two) are normal and not worth a warning,
    so blanks wait in `pending` until a row after them makes them interior.
    """

    count: int = 0
    first: list[int] = field(default_factory=list)
    pending_count: int = 0
    pending_first: list[int] = field(default_factory=list)

    def blank(self, line: int) -> None:
        self.pending_count += 1
        if len(self.pending_first) < MAX_LISTED:
            self.pending_first.append(line)

    def row(self) -> None:
        self.first += self.pending_first[: MAX_LISTED - len(self.first)]
        self.count += self.pending_count
        self.pending_count, self.pending_first = 0, []


def _utf8_error(line: int, byte: int) -> InvalidDataset:
    return InvalidDataset(f"dataset is not UTF-8 text: byte 0x{byte:02x} on line {line} cannot be decoded")


def _too_long(line: int, unit: str) -> InvalidDataset:
    return InvalidDataset(
        f"line {line} is longer than {MAX_LINE_BYTES:,} {unit}, the limit for one row; "
        "is this the right file? (JSONL needs one row per line)"
    )


def _too_many_rows(line: int) -> InvalidDataset:
    return InvalidDataset(
        f"the dataset has more than {MAX_ROWS:,} rows (the limit, reached on line {line}); "
        "upload a sample of at most that many rows"
    )


def _binary_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the newline); lines end at b'\\n' only, as JSONL's do."""
    number = 0
    while chunk := handle.readline(MAX_LINE_BYTES + 2):
        number += 1
        content = chunk.removesuffix(b"\n").removesuffix(b"\r")
        if len(content) > MAX_LINE_BYTES:
            raise _too_long(number, "bytes")
        yield number, content


def _decode_line(number: int, content: bytes) -> str:
    """UTF-8 (a BOM is allowed on line 1); anything else is refused with the line of the first bad byte."""
    try:
        return content.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(number, content[exc.start]) from None


def _json_row(number: int, line: str, problems: Problems) -> RawRow | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        problems.add("invalid JSON", number, f"line {number}: {exc.msg} at column {exc.colno}")
        return None
    except (ValueError, RecursionError):  # a number with thousands of digits, or arrays nested thousands deep
        problems.add("invalid JSON", number, f"line {number}: a number or nesting too large to read")
        return None
    if not isinstance(value, dict):
        problems.add("not a JSON object", number, f"line {number} holds a {type(value).__name__}")
        return None
    return RawRow(number, value)


def read_jsonl(handle: BinaryIO, required: tuple[str, ...], problems: Problems, blanks: BlankLines) -> Iterator[RawRow]:
    """One JSON object per line. Splitting on b'\\n' only keeps U+2028 inside JSON strings intact."""
    del required  # a JSONL row names its own fields; missing ones are reported per row
    for number, content in _binary_lines(handle):
        line = _decode_line(number, content)
        if not line.strip():
            blanks.blank(number)
            continue
        row = _json_row(number, line, problems)
        if row is not None:
            yield row


class _CsvLines:
    """The decoded physical lines of a CSV file for csv.reader, each bounded, with exact line numbers.

    newline='' keeps a quoted field's own line breaks (CR, LF or CRLF) for the csv module, as
    its documentation requires.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self.text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.text.readline(MAX_LINE_BYTES + 2)
        if not line:
            raise StopIteration
        self.number += 1
        if len(line.rstrip("\r\n")) > MAX_LINE_BYTES:
            raise _too_long(self.number, "characters")
        bad = None if line.isascii() else _ESCAPED_BYTE.search(line)
        if bad is not None:
            raise _utf8_error(self.number, ord(bad.group()) - 0xDC00)
        return line

    def detach(self) -> None:
        """Leave the caller's handle open: it belongs to whoever opened it."""
        self.text.detach()


def _csv_header(reader: Iterator[list[str]], required: tuple[str, ...]) -> list[str]:
    """The first row with any content (leading blank lines are skipped)."""
    header = next((row for row in reader if any(cell.strip() for cell in row)), None)
    if header is None:
        raise InvalidDataset("dataset is empty: no header row and no data rows")
    missing = [name for name in required if name not in header]
    if missing:
        columns = ", ".join(repr(h) for h in header)
        names = ", ".join(repr(m) for m in missing)
        raise InvalidDataset(f"CSV header has no {names} column; its columns are: {columns} (set text_field/label_field)")
    return header


def read_csv(handle: BinaryIO, required: tuple[str, ...], problems: Problems, blanks: BlankLines) -> Iterator[RawRow]:
    """A header row, then one record per row; quoted fields may span lines (a row is numbered by its last line)."""
    del problems  # CSV structure errors stop the parse: later line numbers would be guesses
    lines = _CsvLines(handle)
    reader = csv.reader(lines)
    try:
        header = _csv_header(reader, required)
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                blanks.blank(reader.line_num)
                continue
            yield RawRow(reader.line_num, dict(zip(header, cells, strict=False)))
    except csv.Error as exc:
        raise InvalidDataset(f"CSV is malformed on line {reader.line_num}: {exc}") from None
    finally:
        lines.detach()


# Parquet is read a batch of rows at a time, only the two named columns: memory follows the batch.
PARQUET_BATCH_ROWS = 4096


def _parquet_file(handle: BinaryIO) -> Any:
    import pyarrow as pa  # imported here: only Parquet uploads pay for it
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidDataset(f"the file is not a Parquet file pyarrow can read: {exc}") from None


def read_parquet(handle: BinaryIO, required: tuple[str, ...], problems: Problems, blanks: BlankLines) -> Iterator[RawRow]:
    """The named columns of a Parquet file (a seekable handle: uploads are spooled to disk), one row
    at a time; rows are numbered from 1 in file order, as the messages call them lines."""
    del problems, blanks  # types and empty values are checked per row by the caller, like JSONL's
    file = _parquet_file(handle)
    columns = file.schema_arrow.names
    missing = [name for name in required if name not in columns]
    if missing:
        names, have = ", ".join(repr(m) for m in missing), ", ".join(repr(c) for c in columns)
        raise InvalidDataset(f"Parquet file has no {names} column; its columns are: {have} (set text_field/label_field)")
    number = 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(dict.fromkeys(required))):
        for fields in batch.to_pylist():
            number += 1
            if any(isinstance(v, str) and len(v) > MAX_LINE_BYTES for v in fields.values()):
                raise _too_long(number, "characters")
            yield RawRow(number, fields)


RowReader = Callable[[BinaryIO, tuple[str, ...], Problems, BlankLines], Iterator[RawRow]]
READERS: dict[str, RowReader] = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}
FORMATS = tuple(READERS)


def read_rows(
    handle: BinaryIO, fmt: str, required: tuple[str, ...], problems: Problems, blanks: BlankLines
) -> Iterator[RawRow]:
    """The rows of an upload in file order, at most MAX_ROWS of them."""
    reader = READERS.get(fmt)
    if reader is None:
        raise InvalidDataset(f"unknown dataset format {fmt!r}; use {', '.join(repr(f) for f in FORMATS)}")
    # closing(): the reader lets go of the caller's handle now, not whenever the generator is collected
    with contextlib.closing(reader(handle, required, problems, blanks)) as rows:
        for count, row in enumerate(rows, start=1):
            if count > MAX_ROWS:
                raise _too_many_rows(row.line)
            blanks.row()
            yield row

