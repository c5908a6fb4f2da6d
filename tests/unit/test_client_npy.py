"""`embed --input --output` writes its .npy a chunk of rows at a time (header last) and reads its input lazily,
so neither side of it holds the whole file."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from adaptgate_client.cli.commands import chunked, read_texts
from adaptgate_client.npy import HEADER_BYTES, NpyRowWriter


def test_rows_appended_in_chunks_load_as_one_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 7)).astype(np.float32) for n in (5, 1, 13, 0, 2)]
    with NpyRowWriter(tmp_path / "out.npy") as out:
        for part in parts:
            out.append(part)
    loaded = np.load(tmp_path / "out.npy")
    assert loaded.dtype == np.float32 and loaded.shape == (21, 7)
    np.testing.assert_array_equal(loaded, np.concatenate(parts))
    assert np.load(tmp_path / "out.npy", mmap_mode="r").offset == HEADER_BYTES


def test_no_rows_load_as_an_empty_array_and_a_failure_leaves_no_file(tmp_path: Path) -> None:
    with NpyRowWriter(tmp_path / "empty.npy"):
        pass
    assert np.load(tmp_path / "empty.npy").shape == (0, 0)
    with pytest.raises(ValueError), NpyRowWriter(tmp_path / "bad.npy") as out:
        out.append(np.zeros((2, 3), np.float32))
        out.append(np.zeros((2, 4), np.float32))
    assert not (tmp_path / "bad.npy").exists()


def test_writing_many_rows_holds_one_chunk_at_a_time(tmp_path: Path) -> None:
    chunk = np.ones((1000, 384), np.float32)  # 1.5 MB a chunk, 60 MB in all
    tracemalloc.start()
    with NpyRowWriter(tmp_path / "big.npy") as out:
        for _ in range(40):
            out.append(chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * chunk.nbytes, peak
    assert np.load(tmp_path / "big.npy", mmap_mode="r").shape == (40_000, 384)


def test_input_is_read_lazily_in_chunks(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("a\n\nb\nc\n")
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n{"text": "y", "label": 1}\n')
    texts = read_texts(tmp_path / "t.txt")
    assert next(texts) == "a"  # a generator: the file is not read whole first
    assert list(chunked(read_texts(tmp_path / "t.txt"), 2)) == [["a", "b"], ["c"]]
    assert list(read_texts(tmp_path / "t.jsonl")) == ["x", "y"]
