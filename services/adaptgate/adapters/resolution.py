"""Reference resolution served from memory, checked against the store on every call.

Each adapter name (`<root>/<tenant>/<name>/`) has a view in memory: its versions, its aliases and
the records read so far. A view is valid while the adapter's stamp is unchanged. The stamp is the
content of the adapter's generation file, which every write of this store (publish, alias move,
delete) replaces with a fresh random token before it returns, plus the `stat` of the adapter
directory. So one `open`+`read` and one `stat` per call replace the directory listing and the JSON
reads, and a write made by any replica sharing the volume is seen by the next call on every other.

Why a file's content and not only timestamps: a directory's mtime is as coarse as the kernel's
clock tick, an inode number is reused as soon as it is freed, and an NFS client keeps a
directory's attributes for up to its `acdirmax` while an `open` is revalidated against the server
(close-to-open consistency). Why the directory `stat` as well: it sees what the token cannot, a
write by a replica of an older version (no token) or a version removed by hand. inotify is not
used: it sees only this host's writes, so the stamp would be needed anyway. A view older than
`max_age_s` is re-read regardless, which bounds staleness on an NFS mount for writes that carry
no token. An adapter with no token yet is cached only once its directory has been still for a
while, since two writes within one clock tick can leave the same mtime.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from adaptgate.durable import write_atomically

GENERATION_FILE = "generation"
_TOKEN_BYTES = 16
_READ_BYTES = 64
_UNSETTLED_NS = 2_000_000_000  # a directory modified this recently may change again within one mtime tick
DEFAULT_MAX_AGE_S = 10.0
# Not there: ESTALE is NFS's word for a directory another host removed.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})

Stamp = tuple[bytes | None, int, int, int, int, int]  # token, then st_dev, st_ino, st_mtime_ns, st_ctime_ns, st_nlink
R = TypeVar("R")


def bump_generation(adapter_dir: Path) -> None:
    """Tell every replica's resolver that `adapter_dir` changed; call after the change, before acknowledging it."""
    write_atomically(adapter_dir / GENERATION_FILE, secrets.token_hex(_TOKEN_BYTES).encode())


def read_stamp(adapter_dir: str, generation_file: str) -> Stamp | None:
    """The adapter's stamp, or None when its directory does not exist. The token is read before the
    directory's `stat`, and both before any view is read, so a view is never older than its stamp."""
    try:
        fd = os.open(generation_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        token = None
    else:
        try:
            token = os.read(fd, _READ_BYTES)
        finally:
            os.close(fd)
    try:
        st = os.stat(adapter_dir)
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        return None
    return token, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink


@dataclass
class AdapterView(Generic[R]):
    """One adapter name as the store held it just after its stamp was read: never changed once built,
    except `records`, filled as versions are first asked for (a republished version has a new stamp)."""

    versions: frozenset[int]
    latest: int | None
    aliases: dict[str, int]
    records: dict[int, R] = field(default_factory=dict)


@dataclass
class _Entry(Generic[R]):
    adapter_dir: str
    generation_file: str
    stamp: Stamp
    view: AdapterView[R]
    expires: float  # time.monotonic() after which the view is re-read whatever its stamp says


@dataclass
class ResolverStats:
    """Counters for metrics and tests: `hits` answered from memory, `loads` read from the disk."""

    hits: int = 0
    loads: int = 0


class Resolver(Generic[R]):
    """Views of adapter names, keyed by (tenant, name). Only names that exist are kept, so
    references to names that do not exist cost nothing in memory.

    Safe to call from several threads: an entry is replaced whole, and two threads re-reading one
    name at once only both do the work; the one that stores last stores a view no older than its stamp.
    """

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self.stats = ResolverStats()
        self._entries: dict[tuple[str, str], _Entry[R]] = {}

    def view(
        self, tenant: str, name: str, adapter_dir: Callable[[], Path], load: Callable[[], AdapterView[R]]
    ) -> AdapterView[R] | None:
        """The current view of tenant/name, or None if it does not exist.

        `adapter_dir` validates the names and gives the directory (only called for a name not in
        memory); `load` reads the view from the disk, checking again that the directory is inside
        the store (a directory swapped for a link changes the stamp, so that check runs again).
        """
        key = (tenant, name)
        entry = self._entries.get(key)
        if entry is None:
            directory = adapter_dir()
            paths = str(directory), str(directory / GENERATION_FILE)
        else:
            paths = entry.adapter_dir, entry.generation_file
        stamp = read_stamp(*paths)
        if stamp is None:
            self._entries.pop(key, None)
            return None
        now = time.monotonic()
        if entry is not None and entry.stamp == stamp and now < entry.expires:
            self.stats.hits += 1
            return entry.view
        view = load()
        self.stats.loads += 1
        if stamp[0] is not None or time.time_ns() - stamp[3] > _UNSETTLED_NS:
            self._entries[key] = _Entry(paths[0], paths[1], stamp, view, now + self.max_age_s)
        else:
            self._entries.pop(key, None)
        return view


# Filesystems whose reads can wait on a network round trip (or a FUSE daemon): resolution then runs on a
# worker thread. On any other (ext4, xfs, overlay, tmpfs, ...) the stamp's read and stat take microseconds,
# less than the hop, and run on the caller's thread.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "lustre", "gpfs", "afs", "virtiofs"})


def on_local_filesystem(path: Path, mounts: str | None = None) -> bool:
    """Whether `path` lies on a local filesystem, from the mount table (`/proc/mounts`; `mounts` for tests).

    The longest mount point that contains the path decides. Unknown (no mount table): not local.
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    target, best, fstype = str(path.resolve()), "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return bool(best) and fstype not in NETWORK_FILESYSTEMS and not fstype.startswith("fuse")
