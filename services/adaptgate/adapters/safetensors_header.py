"""Read a safetensors file's header without loading a tensor, so that names, dtypes and shapes
can be judged before any memory is spent on the weights.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the bytes after the header), and
an optional "__metadata__" object of strings. Everything a hostile file could lie about is
checked here: the header's length, its JSON, every dtype, shape and offset pair.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adaptgate.errors import InvalidAdapter

# A LoRA adapter for a 7B decoder has ~450 tensors, ~60 KiB of header; 4 MiB leaves a wide margin
# and still bounds what a hostile header can make the JSON parser build.
MAX_HEADER_BYTES = 4 << 20
# No weight this service serves has more than two dimensions; a few more is still well-formed.
MAX_DIMS = 8
METADATA_KEY = "__metadata__"

# Bytes per element of every dtype safetensors writes (sub-byte and complex types are not served).
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: what the tensor claims to be and where its bytes lie after the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _bad(reason: str, what: str) -> InvalidAdapter:
    return InvalidAdapter(f"{what} is not a readable safetensors file: {reason}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A name given twice is ambiguous (which one would be loaded?), so it is refused."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"tensor {key!r} is listed twice")
        out[key] = value
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, raw: object, data_bytes: int, what: str) -> TensorInfo:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"the entry of {name!r} must hold exactly dtype, shape and data_offsets", what)
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _bad(f"tensor {name!r} has an unknown dtype {dtype!r}", what)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise _bad(f"tensor {name!r} has shape {shape!r}; a shape is a list of at most {MAX_DIMS} non-negative integers", what)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _bad(f"tensor {name!r} has data_offsets {offsets!r}; they must be two non-negative integers", what)
    info = TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]))
    begin, end = info.data_offsets
    if not begin <= end <= data_bytes:
        raise _bad(f"tensor {name!r} claims bytes {begin}..{end}, outside the {data_bytes} bytes of data", what)
    if end - begin != info.numel * DTYPE_BYTES[dtype]:
        raise _bad(f"tensor {name!r} ({dtype}{list(shape)}) needs {info.numel * DTYPE_BYTES[dtype]} bytes but has {end - begin}", what)
    return info


def _no_overlap(infos: list[TensorInfo], what: str) -> None:
    """Two tensors sharing bytes would alias each other; safetensors forbids it and so does this check."""
    spans = sorted((info.data_offsets, info.name) for info in infos if info.numel)
    for ((_, end), name), ((begin, _), other) in zip(spans, spans[1:]):
        if begin < end:
            raise _bad(f"tensors {name!r} and {other!r} overlap", what)


def _header_json(handle: BinaryIO, size: int, what: str) -> tuple[dict[str, object], int]:
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise _bad("it is shorter than the 8-byte header length", what)
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise _bad(f"its header is {length} bytes; the limit is {MAX_HEADER_BYTES}", what)
    if 8 + length > size:
        raise _bad(f"its header claims {length} bytes but the file has only {size - 8} after the length", what)
    try:
        header = json.loads(handle.read(length).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"its header is not valid JSON ({exc})", what) from None
    if not isinstance(header, dict):
        raise _bad("its header must be a JSON object", what)
    return header, size - 8 - length


def read_header(handle: BinaryIO, size: int, what: str = "adapter_model.safetensors") -> dict[str, TensorInfo]:
    """Every tensor's entry, checked for well-formedness; `size` is the file's length in bytes."""
    header, data_bytes = _header_json(handle, size, what)
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(f"{METADATA_KEY} must map names to strings", what)
    infos = [_entry(name, raw, data_bytes, what) for name, raw in header.items()]
    _no_overlap(infos, what)
    return {info.name: info for info in infos}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """read_header on a file: only the length prefix and the header are read, never the weights."""
    with open(path, "rb") as handle:
        return read_header(handle, os.fstat(handle.fileno()).st_size)


def read_safetensors_header_bytes(data: bytes) -> dict[str, TensorInfo]:
    """read_header on a file already in memory."""
    return read_header(io.BytesIO(data), len(data))
