from __future__ import annotations

import json

import pytest

from adaptgate.errors import InvalidDataset
from adaptgate.training.datasets import parse_dataset
from adaptgate.training.problems import describe_lines

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
    assert "unknown dataset format 'parquet'" in rejected(jsonl(GOOD), "parquet")


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
