"""Shared storage: the one location every control replica and Ray worker reads and writes.

Training checkpoints (and datasets) must outlive any one process and any one node: a job killed
with its node resumes on another worker from what the first one saved, and another control
replica takes over a job whose owner died. So they live at one location named by a setting
(`ADAPTGATE_STORAGE_URI`): a directory every machine mounts (NFS, a Kubernetes volume) or an
fsspec URI (`file:///shared`, `s3://bucket/prefix`, `gs://...` once that driver is installed),
never a node's local disk or TMPDIR.

`Storage` is a small typed handle over fsspec (`fsspec.core.url_to_fs`). Its contract:
- Whole-file writes are atomic: a reader sees the old file or the new one, never a mix, and a
  write that fails half-way leaves the old file. On a local (or mounted) filesystem the bytes go
  to a temporary file in the same directory, are fsynced and renamed over the target; on an
  object store one upload is atomic by itself (the object appears when the upload completes).
- A handle travels as its URI: pickling it (Ray ships job parameters that way) and unpickling it
  on another node reaches the same files. A plain relative path is made absolute first, since a
  worker's working directory is not the gateway's.
- `child` steps one name down and never out (no "..", no "/"), so names that come from requests
  cannot escape the root.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from adaptgate.durable import write_atomically
from adaptgate.errors import FailedPrecondition

COPY_CHUNK = 1 << 20


class StorageError(FailedPrecondition):
    """The storage location cannot be used as configured (an unknown URI scheme, a missing driver)."""


def _open(uri: str) -> tuple[AbstractFileSystem, str]:
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0]
        raise StorageError(
            f"cannot open the storage location {uri}: {exc}; install the fsspec driver for '{scheme}://' "
            "(s3fs for s3://, gcsfs for gs://) or set ADAPTGATE_STORAGE_URI to a directory every gateway and Ray worker mounts"
        ) from exc


class Storage:
    """A file or folder on shared storage, named by a plain path or an fsspec URI."""

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        text = os.fspath(uri)
        if not text:
            raise StorageError("the storage location is empty; name a directory or a filesystem URI")
        self.fs, self.path = _open(text)
        # A URI keeps the form it was given in; a plain path becomes absolute (workers start elsewhere).
        self.uri = _without_trailing_slash(text) if "://" in text else self.path

    @classmethod
    def _at(cls, fs: AbstractFileSystem, path: str, uri: str) -> Storage:
        handle = cls.__new__(cls)
        handle.fs, handle.path, handle.uri = fs, path, uri
        return handle

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return Storage, (self.uri,)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local(self) -> bool:
        """True on a local or mounted filesystem (renames are atomic there), False on an object store."""
        return isinstance(self.fs, LocalFileSystem)

    def child(self, *names: str) -> Storage:
        """The location `names` below this one; each name is one step down (no "/", "." or "..")."""
        path, uri = self.path.rstrip("/"), self.uri
        for name in names:
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                raise ValueError(f"a storage child is one name, not {name!r}")
            path, uri = f"{path}/{name}", f"{uri}/{name}"
        return Storage._at(self.fs, path, uri)

    # ----- reading ----------------------------------------------------------------------------

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def read_bytes(self) -> bytes:
        """The whole file; FileNotFoundError when there is none."""
        return bytes(self.fs.cat_file(self.path))

    def lines(self) -> Iterator[str]:
        """The file's text lines (UTF-8), without their line ends, read as they are needed."""
        with self.fs.open(self.path, "rt", encoding="utf-8", newline=None) as handle:
            for line in handle:
                yield line.rstrip("\n")

    def size(self) -> int:
        return int(self.fs.size(self.path))

    # ----- writing: whole files, atomically -----------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        self.write_chunks((data,))

    def write_file(self, local: str | os.PathLike[str]) -> int:
        """Copy a local file here (e.g. an upload spooled to a temporary file); returns the bytes written."""
        with open(local, "rb") as source:
            return self.write_chunks(iter(lambda: source.read(COPY_CHUNK), b""))

    def write_chunks(self, chunks: Iterable[bytes]) -> int:
        """Replace the file with the concatenated chunks, all or nothing; returns the bytes written.
        An exception from `chunks` (a cancelled upload) leaves the old file as it was."""
        if self.local:
            return self._write_local(chunks)
        with self.fs.open(self.path, "wb") as out:  # an object store publishes the object when the upload completes
            return sum(out.write(chunk) for chunk in chunks)

    def _write_local(self, chunks: Iterable[bytes]) -> int:
        written = 0

        def counted() -> Iterator[bytes]:
            nonlocal written
            for chunk in chunks:
                written += len(chunk)
                yield chunk

        write_atomically(Path(self.path), counted())
        return written

    # ----- removing ---------------------------------------------------------------------------

    def remove_tree(self) -> None:
        """Remove this folder (or file) and everything under it; nothing to do when it is gone."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=True)


def _without_trailing_slash(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.rstrip('/') or rest}"
