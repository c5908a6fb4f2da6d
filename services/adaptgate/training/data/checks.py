"""Validate an uploaded dataset up front, so a job never fails for a reason visible at upload.

Rejections (InvalidDataset) name lines; accepted-but-suspicious data gets warnings that the
upload returns (RELIABILITY row 22).
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from adaptgate.errors import InvalidDataset
from adaptgate.training.data.problems import Problems, describe_lines
from adaptgate.training.data.rows import BlankLines, RawRow, read_rows

MIN_ROWS = 4
MIN_PER_CLASS = 2
IMBALANCE_RATIO = 0.05
MAX_CONFLICT_FRACTION = 0.01


@dataclass
class ParsedDataset:
    texts: list[str]
    labels: list[str]
    warnings: list[str] = field(default_factory=list)
    # The file line of each row, for messages that point back into the upload.
    lines: list[int] = field(default_factory=list)

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(Counter(self.labels))


def _label_value(value: object) -> str | None:
    """Labels may be strings or integers in JSON; both are kept as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else None


def _field_names(row: RawRow) -> str:
    return ", ".join(repr(k) for k in sorted(row.fields)) or "none"


def _text_of(row: RawRow, name: str, problems: Problems) -> str | None:
    if name not in row.fields:
        problems.add(f"missing text field {name!r}", row.line, f"the rows have fields: {_field_names(row)}")
        return None
    value = row.fields[name]
    if value is not None and not isinstance(value, str):
        problems.add("text is not a string", row.line)
        return None
    if not value or not value.strip():
        problems.add("empty or whitespace-only text", row.line)
        return None
    return value


def _label_of(row: RawRow, name: str, problems: Problems) -> str | None:
    if name not in row.fields:
        problems.add(f"missing label field {name!r}", row.line, f"the rows have fields: {_field_names(row)}")
        return None
    value = row.fields[name]
    if value is None or value == "" or (isinstance(value, str) and not value.strip()):
        problems.add("empty label", row.line)
        return None
    label = _label_value(value)
    if label is None:
        problems.add("label is not a string or an integer", row.line)
    return label


def _extract(rows: Iterable[RawRow], text_field: str, label_field: str, problems: Problems) -> ParsedDataset:
    """Keeps only each row's text, label and line: the row itself is dropped as soon as it is read."""
    parsed = ParsedDataset([], [])
    for row in rows:
        text = _text_of(row, text_field, problems)
        label = _label_of(row, label_field, problems)
        if text is not None and label is not None:
            parsed.texts.append(text)
            parsed.labels.append(label)
            parsed.lines.append(row.line)
    return parsed


def _conflict_groups(parsed: ParsedDataset) -> list[list[int]]:
    """Row indices of each text that carries more than one label."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(parsed.texts):
        rows_of[text].append(i)
    return [rows for rows in rows_of.values() if len({parsed.labels[i] for i in rows}) > 1]


def _refuse_conflicts(parsed: ParsedDataset, groups: list[list[int]], problems: Problems) -> None:
    for rows in groups:
        first = parsed.labels[rows[0]]
        other = next(i for i in rows if parsed.labels[i] != first)
        detail = f"line {parsed.lines[rows[0]]} says {first!r}, line {parsed.lines[other]} says {parsed.labels[other]!r}"
        for i in rows:
            problems.add("the same text has different labels", parsed.lines[i], detail)


def _majority_label(labels: list[str]) -> str | None:
    """The label most rows of a group give, or None on a tie."""
    (top, n), *rest = Counter(labels).most_common()
    return None if rest and rest[0][1] == n else top


def _resolve_conflicts(parsed: ParsedDataset, groups: list[list[int]]) -> str:
    """Keeps each group's majority label (its other rows are dropped) and drops tied groups whole;
    returns the warning that says so."""
    drop: set[int] = set()
    kept = ties = 0
    for rows in groups:
        majority = _majority_label([parsed.labels[i] for i in rows])
        kept, ties = kept + (majority is not None), ties + (majority is None)
        drop.update(i for i in rows if parsed.labels[i] != majority)
    lines = sorted(parsed.lines[i] for rows in groups for i in rows)
    keep = [i for i in range(len(parsed.texts)) if i not in drop]
    parsed.texts, parsed.labels, parsed.lines = ([column[i] for i in keep] for column in (parsed.texts, parsed.labels, parsed.lines))
    return (
        f"{len(groups)} texts have different labels on different lines ({len(lines)} rows, {describe_lines(lines)}): "
        f"{kept} kept {'its' if kept == 1 else 'their'} majority label, {ties} tie{'' if ties == 1 else 's'} had no majority and "
        f"{'was' if ties == 1 else 'were'} dropped whole; {len(drop)} rows dropped in all"
    )


def _check_conflicts(parsed: ParsedDataset, problems: Problems, max_fraction: float) -> list[str]:
    """One text with two labels cannot be learned and would leak across the validation split.

    Real data has a little of this noise: up to `max_fraction` of the rows it is resolved by
    majority (ties dropped) and reported; beyond it the file is refused, naming the lines.
    """
    groups = _conflict_groups(parsed)
    if not groups:
        return []
    if sum(map(len, groups)) > max_fraction * len(parsed.texts):
        _refuse_conflicts(parsed, groups, problems)
        return []
    return [_resolve_conflicts(parsed, groups)]


def _check_classes(parsed: ParsedDataset, problems: Problems, max_labels: int | None) -> None:
    counts = parsed.label_counts
    if len(parsed.texts) < MIN_ROWS:
        problems.add(f"the dataset has {len(parsed.texts)} rows; at least {MIN_ROWS} are needed (2 per class)")
    if len(counts) == 1:
        problems.add(f"every row has the label {next(iter(counts))!r}; a classifier needs at least 2 classes")
    if max_labels is not None and len(counts) > max_labels:
        problems.add(f"the dataset has {len(counts)} classes; at most {max_labels} are supported")
    rare = [label for label, n in counts.items() if n < MIN_PER_CLASS]
    names = ", ".join(repr(r) for r in rare[:5]) + (f" and {len(rare) - 5} more" if len(rare) > 5 else "")
    for label, line in zip(parsed.labels, parsed.lines):
        if label in rare:
            problems.add("classes with a single example", line, f"{names}; each class needs at least 2 so one can be held out for validation")


def _duplicate_warning(parsed: ParsedDataset) -> list[str]:
    seen: set[tuple[str, str]] = set()
    repeats = []
    for text, label, line in zip(parsed.texts, parsed.labels, parsed.lines):
        if (text, label) in seen:
            repeats.append(line)
        seen.add((text, label))
    if not repeats:
        return []
    return [
        f"{len(repeats)} rows repeat an earlier row exactly ({describe_lines(repeats)}); they are kept, "
        "and all copies of a text stay on the same side of the train/validation split"
    ]


def _imbalance_warning(parsed: ParsedDataset) -> list[str]:
    counts = parsed.label_counts
    small, large = min(counts, key=counts.__getitem__), max(counts, key=counts.__getitem__)
    if counts[small] >= IMBALANCE_RATIO * counts[large]:
        return []
    return [
        f"classes are strongly imbalanced: {small!r} has {counts[small]} rows, under "
        f"{IMBALANCE_RATIO:.0%} of {large!r} ({counts[large]} rows); accuracy may hide poor recall on {small!r}"
    ]


def _blank_line_warning(blanks: BlankLines) -> list[str]:
    if not blanks.count:
        return []
    more = blanks.count - len(blanks.first)
    where = describe_lines(blanks.first) + (f" and {more} more" if more else "")
    return [f"skipped {blanks.count} blank {'line' if blanks.count == 1 else 'lines'} ({where})"]


def parse_dataset_stream(
    handle: BinaryIO, fmt: str, text_field: str = "text", label_field: str = "label", max_labels: int | None = None,
    max_conflict_fraction: float = MAX_CONFLICT_FRACTION,
) -> ParsedDataset:
    """Parse and validate an upload read row by row from a binary handle; raises InvalidDataset
    naming every problem and its lines. The handle stays open (it is the caller's)."""
    problems, blanks = Problems(), BlankLines()
    rows = read_rows(handle, fmt.strip().lower(), (text_field, label_field), problems, blanks)
    parsed = _extract(rows, text_field, label_field, problems)
    if not parsed.lines and not problems.items:
        raise InvalidDataset("dataset is empty: the file has no data rows")
    problems.raise_if_any()
    resolved = _check_conflicts(parsed, problems, max_conflict_fraction)
    _check_classes(parsed, problems, max_labels)
    problems.raise_if_any()
    parsed.warnings = _blank_line_warning(blanks) + resolved + _duplicate_warning(parsed) + _imbalance_warning(parsed)
    return parsed


def parse_dataset_file(
    path: Path, fmt: str, text_field: str = "text", label_field: str = "label", max_labels: int | None = None,
    max_conflict_fraction: float = MAX_CONFLICT_FRACTION,
) -> ParsedDataset:
    """parse_dataset_stream on a file (an upload streamed to disk), never reading it whole into memory."""
    with open(path, "rb") as handle:
        return parse_dataset_stream(handle, fmt, text_field, label_field, max_labels, max_conflict_fraction)


def parse_dataset(
    data: bytes, fmt: str, text_field: str = "text", label_field: str = "label", max_labels: int | None = None,
    max_conflict_fraction: float = MAX_CONFLICT_FRACTION,
) -> ParsedDataset:
    """parse_dataset_stream on an upload already in memory (BytesIO shares the bytes, it does not copy them)."""
    return parse_dataset_stream(io.BytesIO(data), fmt, text_field, label_field, max_labels, max_conflict_fraction)
