"""Writes that survive a crash or a power cut: the adapter store and the dataset store share them.

A file is durable once it is fsynced, and a new name (a create, a rename) once its directory is;
readers see the old file or the whole new one, never a torn write.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """A rename or a new file is durable only once its directory's entry is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, payload: bytes | Iterator[bytes]) -> None:
    """Written beside `path`, fsynced, renamed over it, and the rename fsynced; `payload` may be
    an iterator of pieces, so a large file is never one big bytes object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as handle:
            for piece in [payload] if isinstance(payload, bytes) else payload:
                handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
