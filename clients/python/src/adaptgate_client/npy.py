"""An .npy file written a chunk of rows at a time, for outputs larger than memory.

The header is written last: its space is reserved up front (a fixed size, enough for any 2-D shape) and filled
in on close, once the row count is known; the rows go straight to disk as they come.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

HEADER_BYTES = 128  # magic (6) + version (2) + length (2) + the padded dict; a multiple of 64, as the format asks
DTYPE = np.dtype("<f4")


def _header(rows: int, dim: int) -> bytes:
    text = repr({"descr": DTYPE.str, "fortran_order": False, "shape": (rows, dim)})
    body = HEADER_BYTES - 10
    if len(text) + 1 > body:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {HEADER_BYTES}-byte .npy header")
    return np.lib.format.magic(1, 0) + body.to_bytes(2, "little") + (text.ljust(body - 1) + "\n").encode("latin1")


class NpyRowWriter:
    """`with NpyRowWriter(path) as out: out.append(rows)`: [n, dim] float32 rows, any number of appends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows = 0
        self.dim: int | None = None
        self._file: BinaryIO = self.path.open("wb")
        self._file.write(b"\0" * HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        if rows.ndim != 2:
            raise ValueError(f"expected a 2-D block of rows, got shape {rows.shape}")
        if self.dim is None:
            self.dim = rows.shape[1]
        elif rows.shape[1] != self.dim and len(rows):
            raise ValueError(f"rows of width {rows.shape[1]} after rows of width {self.dim}")
        self._file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_header(self.rows, self.dim or 0))
        self._file.close()

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
        if kind is not None:  # a half-written file with a valid header would pass for a complete one
            self.path.unlink(missing_ok=True)
