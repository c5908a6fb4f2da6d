from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path

import pytest

from adaptgate.errors import InvalidDataset
from adaptgate.training.data.datasets import parse_dataset
from adaptgate.training.data.problems import describe_lines

from .conftest import jsonl

GOOD = [
    {"text": "win a prize now", "label": "spam"},
    {"text": "see you at lunch", "label": "ham"},
    {"text": "free ringtones", "label": "spam"},
    {"text": "call me later", "label": "ham"},
]


def rejected(data: bytes, fmt: str = "jsonl", **kwargs: str) -> str:
    with pytest.raises(InvalidDataset) as info:
        parse_dataset(data, fmt, **kwargs)
    return info.value.message


def test_jsonl_accepted_with_int_labels_as_strings() -> None:
    rows = [{"text": r["text"], "label": 1 if r["label"] == "spam" else 0} for r in GOOD]
    parsed = parse_dataset(jsonl(rows), "jsonl")
    assert parsed.texts == [r["text"] for r in GOOD]
    assert parsed.labels == ["1", "0", "1", "0"]
    assert parsed.warnings == []
    assert parsed.label_counts == {"1": 2, "0": 2}


def test_csv_with_custom_columns_and_multiline_field() -> None:
    data = b'id,body,category\n1,"hello\nthere",a\n2,"x, y",b\n3,third,a\n4,fourth,b\n'
    parsed = parse_dataset(data, "CSV", text_field="body", label_field="category")
    assert parsed.texts == ["hello\nthere", "x, y", "third", "fourth"]
    assert parsed.labels == ["a", "b", "a", "b"]


def test_unknown_format() -> None:
    assert "unknown dataset format 'xlsx'; use 'jsonl', 'csv', 'parquet'" in rejected(jsonl(GOOD), "xlsx")


def test_not_utf8_names_the_line() -> None:
    data = jsonl(GOOD) + b'{"text": "caf\xe9", "label": "ham"}\n'
    message = rejected(data)
    assert "not UTF-8" in message and "line 5" in message


@pytest.mark.parametrize("data", [b"", b"  \n\n", b"text,label\n"])
def test_empty_file(data: bytes) -> None:
    assert "empty" in rejected(data, "csv" if data.startswith(b"text") else "jsonl")


def test_invalid_json_lines_listed_with_and_more() -> None:
    lines = [json.dumps(r) for r in GOOD] + ["{bad"] * 8
    message = rejected(("\n".join(lines)).encode())
    assert "invalid JSON on lines 5, 6, 7, 8, 9 and 3 more" in message


def test_not_an_object() -> None:
    assert "not a JSON object on line 2" in rejected(jsonl([GOOD[0]]) + b"[1, 2]\n" + jsonl(GOOD[1:]))


def test_missing_label_field_names_the_fields() -> None:
    rows = [{"text": r["text"], "category": r["label"]} for r in GOOD]
    message = rejected(jsonl(rows))
    assert "missing label field 'label' on lines 1, 2, 3, 4" in message
    assert "'category', 'text'" in message


def test_csv_missing_column_lists_columns() -> None:
    message = rejected(b"body,label\nhello,a\n", "csv")
    assert "no 'text' column" in message and "'body', 'label'" in message


def test_empty_text_and_empty_label_name_rows() -> None:
    rows = GOOD + [{"text": "   ", "label": "ham"}, {"text": "ok", "label": ""}, {"text": "", "label": "spam"}]
    message = rejected(jsonl(rows))
    assert "empty or whitespace-only text on lines 5, 7" in message
    assert "empty label on line 6" in message


def test_csv_empty_text_cell_names_the_line() -> None:
    data = b"text,label\na,x\n,y\nb,x\nc,y\nd,y\n"
    assert "empty or whitespace-only text on line 3" in rejected(data, "csv")


def test_single_class() -> None:
    rows = [{"text": f"t{i}", "label": "spam"} for i in range(5)]
    assert "at least 2 classes" in rejected(jsonl(rows))


def test_class_with_one_example_names_its_line() -> None:
    rows = GOOD + [{"text": "lonely", "label": "rare"}]
    message = rejected(jsonl(rows))
    assert "classes with a single example on line 5" in message and "'rare'" in message


def test_too_few_rows() -> None:
    message = rejected(jsonl(GOOD[:3]))
    assert "3 rows; at least 4" in message


def test_conflicting_labels_rejected_with_both_lines() -> None:
    rows = GOOD + [{"text": "win a prize now", "label": "ham"}]
    message = rejected(jsonl(rows))
    assert "the same text has different labels on lines 1, 5" in message
    assert "line 1 says 'spam', line 5 says 'ham'" in message


def test_duplicates_are_a_warning_with_lines() -> None:
    rows = GOOD + [GOOD[0], GOOD[1], GOOD[0]]
    parsed = parse_dataset(jsonl(rows), "jsonl")
    assert len(parsed.texts) == 7
    assert any("3 rows repeat an earlier row exactly (lines 5, 6, 7)" in w for w in parsed.warnings)


def test_imbalance_warning() -> None:
    rows = [{"text": f"ham {i}", "label": "ham"} for i in range(60)] + GOOD[:1] + GOOD[2:3]
    parsed = parse_dataset(jsonl(rows), "jsonl")
    assert any("imbalanced" in w and "'spam' has 2 rows" in w for w in parsed.warnings)


def test_interior_blank_lines_are_a_warning() -> None:
    data = jsonl(GOOD[:2]) + b"\n\n" + jsonl(GOOD[2:]) + b"\n"
    parsed = parse_dataset(data, "jsonl")
    assert parsed.warnings == ["skipped 2 blank lines (lines 3, 4)"]


def test_unicode_line_separator_inside_json_is_fine() -> None:
    rows = [{"text": "a\u2028b", "label": "x"}, *GOOD, {"text": "c", "label": "x"}]
    parsed = parse_dataset(jsonl(rows).replace(b"\\u2028", "\u2028".encode()), "jsonl")
    assert parsed.texts[0] == "a\u2028b"


def test_max_labels() -> None:
    assert "at most 1 are supported" in rejected(jsonl(GOOD), max_labels=1)  # type: ignore[arg-type]


def test_describe_lines() -> None:
    assert describe_lines([3]) == "line 3"
    assert describe_lines([1, 2, 3, 4, 5, 6, 7]) == "lines 1, 2, 3, 4, 5 and 2 more"


# --- uploads read row by row: bounded lines, bounded rows, memory in proportion to what is kept ---


def parse_file(tmp_path: Path, data: bytes, fmt: str = "jsonl", **kwargs: object):
    from adaptgate.training.data.checks import parse_dataset_file

    path = tmp_path / f"upload.{fmt}"
    path.write_bytes(data)
    return parse_dataset_file(path, fmt, **kwargs)  # type: ignore[arg-type]


def rejected_file(tmp_path: Path, data: bytes, fmt: str = "jsonl", **kwargs: object) -> str:
    with pytest.raises(InvalidDataset) as info:
        parse_file(tmp_path, data, fmt, **kwargs)
    return info.value.message


def test_a_file_parses_like_the_same_bytes(tmp_path: Path) -> None:
    rows = GOOD + [GOOD[0]]
    data = jsonl(GOOD[:2]) + b"\n\n" + jsonl(GOOD[2:]) + jsonl([GOOD[0]])
    from_file, from_bytes = parse_file(tmp_path, data), parse_dataset(data, "jsonl")
    assert from_file.texts == from_bytes.texts == [r["text"] for r in rows]
    assert from_file.lines == from_bytes.lines == [1, 2, 5, 6, 7]
    assert from_file.warnings == from_bytes.warnings and len(from_file.warnings) == 2
    csv_data = b'text,label\r\n"two\r\nlines",a\r\nb,b\r\nc,a\r\nd,b\r\n'
    assert parse_file(tmp_path, csv_data, "csv").lines == [3, 4, 5, 6]


def test_memory_follows_the_kept_rows_not_the_file(tmp_path: Path) -> None:
    """A 10 MB upload whose rows carry a large ignored field costs about one row of memory, not the file.

    (100 kB stays under the csv module's own 128 kB bound on one field.)"""
    pad = "p" * 100_000
    rows = [{"text": f"row {i}", "label": "ab"[i % 2], "notes": pad} for i in range(100)]
    for fmt, data in (("jsonl", jsonl(rows)), ("csv", csv_bytes(rows))):
        for parse in (parse_dataset, lambda data, fmt: parse_file(tmp_path, data, fmt)):
            tracemalloc.start()
            try:
                parsed = parse(data, fmt)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert len(parsed.texts) == 100
            assert peak < len(data) / 4, f"{fmt}: parsing a {len(data)}-byte upload peaked at {peak} bytes"


def csv_bytes(rows: list[dict[str, object]]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def test_a_line_over_the_limit_is_refused_with_its_number(tmp_path: Path) -> None:
    from adaptgate.training.data.rows import MAX_LINE_BYTES

    long_row = json.dumps({"text": "x" * MAX_LINE_BYTES, "label": "spam"}).encode() + b"\n"
    message = rejected_file(tmp_path, jsonl(GOOD[:2]) + long_row + jsonl(GOOD[2:]))
    assert "line 3 is longer than 1,048,576 bytes" in message
    csv_row = b"y" * (MAX_LINE_BYTES + 1) + b",spam\n"
    assert "line 2 is longer than" in rejected_file(tmp_path, b"text,label\n" + csv_row + b"a,b\n", "csv")
    assert "line 2 is longer than" in rejected(b"text,label\n" + csv_row, "csv")


def test_the_row_count_is_capped_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptgate.training.data import rows as dataset_rows

    monkeypatch.setattr(dataset_rows, "MAX_ROWS", 6)
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(7)]
    assert len(parse_file(tmp_path, jsonl(rows[:6])).texts) == 6
    message = rejected_file(tmp_path, jsonl(rows[:3]) + b"\n" + jsonl(rows[3:]))
    assert "more than 6 rows" in message and "line 8" in message
    assert "more than 6 rows" in rejected_file(tmp_path, b"text,label\n" + b"".join(b"t%d,a\n" % i for i in range(7)), "csv")


def test_bad_utf8_deep_in_a_csv_names_its_line(tmp_path: Path) -> None:
    """Decoding happens in chunks; the line of the bad byte is still exact."""
    lines = [b"text,label"] + [b"row number %d,%s" % (i, b"ab"[i % 2 : i % 2 + 1]) for i in range(5000)]
    lines[3001] = b"caf\xe9,a"
    message = rejected_file(tmp_path, b"\r\n".join(lines) + b"\r\n", "csv")
    assert "byte 0xe9 on line 3002" in message
    message = rejected_file(tmp_path, b"\r".join(lines).replace(b"row number 7,", b'"multi\nline",'), "csv")
    assert "byte 0xe9 on line 3003" in message  # a bare CR ends a line too, and the quoted LF counts as one


@pytest.mark.parametrize(
    "line",
    [b'{"text": "a", "label": 1' + b"0" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000],
)
def test_json_too_large_to_read_is_a_row_problem(line: bytes) -> None:
    message = rejected(jsonl(GOOD) + line + b"\n")
    assert "invalid JSON on line 5" in message


def noisy(n_clean: int, groups: list[list[str]]) -> tuple[bytes, list[int]]:
    """n_clean rows of distinct texts over two classes, then one group of rows per entry of
    `groups`, each row sharing its group's text with the labels given; returns the file and
    the line numbers of the conflicting rows."""
    rows = [{"text": f"clean text number {i}", "label": ("a", "b")[i % 2]} for i in range(n_clean)]
    lines = []
    for g, labels in enumerate(groups):
        for label in labels:
            rows.append({"text": f"noisy text {g}", "label": label})
            lines.append(len(rows))
    return jsonl(rows), lines


def test_a_few_conflicting_labels_keep_the_majority_and_drop_ties_with_a_warning() -> None:
    data, lines = noisy(400, [["a", "a", "b"], ["a", "b"]])  # 5 conflicting rows of 405: 1.2% > 1%
    rejected(data)  # above the default limit: refused as before
    parsed = parse_dataset(data, "jsonl", max_conflict_fraction=0.02)
    kept = {t: label for t, label in zip(parsed.texts, parsed.labels) if t.startswith("noisy")}
    assert kept == {"noisy text 0": "a"}  # majority kept (both of its rows), the tie dropped whole
    assert parsed.texts.count("noisy text 0") == 2 and len(parsed.texts) == 402
    warning = next(w for w in parsed.warnings if "different labels" in w)
    assert "2 texts" in warning and "5 rows" in warning and f"lines {lines[0]}, {lines[1]}" in warning
    assert "1 kept its majority label" in warning and "1 tie" in warning and "3 rows dropped" in warning


def test_conflicts_under_the_default_limit_are_resolved_not_refused() -> None:
    data, _ = noisy(1000, [["b", "a", "b"]])  # 3 of 1003 rows: 0.3%
    parsed = parse_dataset(data, "jsonl")
    assert [label for t, label in zip(parsed.texts, parsed.labels) if t == "noisy text 0"] == ["b", "b"]
    assert any("different labels" in w for w in parsed.warnings)


def test_a_class_left_with_one_example_after_dropping_a_tie_is_still_refused() -> None:
    rows = [{"text": f"t{i}", "label": "a"} for i in range(300)] + [{"text": "odd", "label": "c"}, {"text": "odd", "label": "a"},
                                                                   {"text": "alone", "label": "c"}]
    message = rejected(jsonl(rows), max_conflict_fraction=0.05)
    assert "classes with a single example" in message


def parquet(columns: dict[str, list[object]], row_group_size: int = 2) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table(columns), out, row_group_size=row_group_size)
    return out.getvalue()


def test_parquet_parses_like_the_same_jsonl_rows() -> None:
    texts, labels = [r["text"] for r in GOOD], [r["label"] for r in GOOD]
    from_parquet = parse_dataset(parquet({"sentence": texts, "y": labels, "extra": [1, 2, 3, 4]}), "parquet",
                                 text_field="sentence", label_field="y")
    from_jsonl = parse_dataset(jsonl(GOOD), "jsonl")
    assert (from_parquet.texts, from_parquet.labels) == (from_jsonl.texts, from_jsonl.labels)
    assert from_parquet.lines == [1, 2, 3, 4]  # row numbers, so problems point at rows


def test_parquet_integer_labels_and_problems_name_their_rows() -> None:
    parsed = parse_dataset(parquet({"text": [r["text"] for r in GOOD], "label": [1, 0, 1, 0]}), "parquet")
    assert parsed.labels == ["1", "0", "1", "0"]
    message = rejected(parquet({"text": ["a b", None, "c d", "e f", "g h"], "label": ["x", "y", "x", "y", "y"]}), "parquet")
    assert "empty or whitespace-only text on line 2" in message


def test_parquet_missing_columns_and_non_parquet_bytes_are_clear_errors() -> None:
    message = rejected(parquet({"body": ["a"], "label": ["x"]}), "parquet")
    assert "no 'text' column" in message and "'body'" in message
    assert "not a Parquet file" in rejected(jsonl(GOOD), "parquet")
