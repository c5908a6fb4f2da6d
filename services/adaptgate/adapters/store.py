"""The versioned adapter store on local disk.

Layout: `<root>/<tenant>/<name>/v<N>/` (the adapter's files plus `record.json`),
`<root>/<tenant>/<name>/aliases.json` and `<root>/<tenant>/<name>/version.json` (the highest
version ever published, so a deleted version's number is never handed out again while the name
exists). A version is staged under `<root>/.staging/`, appears by one atomic rename after
validation and disappears by one atomic rename before its files are removed, and an alias moves by one atomic file replace, so readers never see
half a write. Each write then replaces the adapter's generation file before it returns, which lets
every replica sharing the store answer resolution from memory and still see the write on its next
call (`adaptgate.adapters.resolution`). Every write is fsynced with its directory: a power cut keeps
either the old state or the new one. Anything else found in the store (`lost+found`, `.DS_Store`, a name the store would
never write) is skipped, never an error.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from adaptgate.adapters.format import ALLOWED_FILES, WEIGHTS_FILE, AdapterWeights
from adaptgate.adapters.refs import NAME_PATTERN, AdapterRef, check_name
from adaptgate.adapters.resolution import DEFAULT_MAX_AGE_S, AdapterView, Resolver, ResolverStats, bump_generation, on_local_filesystem
from adaptgate.adapters.validation import AdapterValidator, check_filenames
from adaptgate.durable import fsync_dir, fsync_file, write_atomically, write_synced
from adaptgate.errors import AdapterNotFound, FailedPrecondition, InvalidArgument
from adaptgate.quotas import StorageQuotas, Usage

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"
ALIASES_FILE = "aliases.json"
VERSION_FILE = "version.json"
_VERSION_DIR = re.compile(r"v([0-9]{1,9})")
STAGING_DIR = ".staging"
DELETING_PREFIX = ".deleting-"
STALE_STAGING_S = 24 * 3600.0


@dataclass
class AdapterRecord:
    tenant: str
    name: str
    version: int
    labels: list[str]
    rank: int
    target_modules: list[str]
    size_bytes: int
    created_at: float
    source: str
    aliases: list[str] = field(default_factory=list)
    # Classify abstains with abstain_label below this top score (None: never); adaptgate.json's "abstain".
    abstain_threshold: float | None = None
    abstain_label: str = ""

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, self.version)


@dataclass
class Deletion:
    """What a delete removed: concrete versions, and the aliases that pointed at them (force only)."""

    refs: list[AdapterRef]
    aliases: list[str]


def _make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing the parent of each directory it creates."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def _stored_bytes(version_dir: Path) -> int:
    """The adapter's own files (what was uploaded or published), not the store's record."""
    return sum(e.stat().st_size for e in os.scandir(version_dir) if e.name in ALLOWED_FILES and e.is_file())


class AdapterStore:
    def __init__(
        self, root: Path, validator: AdapterValidator, quotas: StorageQuotas | None = None,
        max_resolve_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> None:
        self.root = root.resolve()
        self._resolver: Resolver[AdapterRecord] = Resolver(max_resolve_age_s)
        # Whether a resolve may run on the event loop: microseconds on a local disk, a round trip on NFS.
        self.local = on_local_filesystem(self.root)
        self.validator = validator
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # version numbers, alias files and deletes: one writer at a time
        self.quotas = quotas or StorageQuotas()
        self.quotas.track(self.usage)
        self._staging_root = self.root / STAGING_DIR  # made by the first publish: readers may mount the store read-only
        self._sweep_staging()

    def _adapter_dir(self, tenant: str, name: str) -> Path:
        path = (self.root / check_name(tenant, "tenant") / check_name(name, "adapter name")).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"adapter {tenant}/{name} resolves outside the store")
        return path

    def _unresolved_dir(self, tenant: str, name: str) -> Path:
        """Checked like `_adapter_dir`, but not followed through links, so a link swapped later changes the stamp."""
        self._adapter_dir(tenant, name)
        return self.root / tenant / name

    @property
    def resolve_stats(self) -> ResolverStats:
        """How many resolutions memory answered (`hits`) and how many read the disk (`loads`)."""
        return self._resolver.stats

    def version_dir(self, ref: AdapterRef) -> Path:
        return self._adapter_dir(ref.tenant, ref.name) / f"v{ref.version}"

    # ----- publishing -------------------------------------------------------------------------

    def publish(self, tenant: str, name: str, files: dict[str, bytes], alias: str = "", source: str = "upload") -> AdapterRecord:
        """Validate, then write a new version; the alias (if any) moves only once the version is complete.

        A job re-run after a gateway crash publishes with the same `job:<id>` source; it gets the
        version the first run wrote instead of a duplicate.
        """
        if source.startswith("job:") and (existing := self._published_by(tenant, name, source)) is not None:
            if alias:
                self.set_alias(existing.ref, alias)
            return self.get(existing.ref)
        self._check_names(tenant, name, alias)
        weights = self.validator.parse(files)
        staging = self._new_staging()
        try:
            for filename, data in files.items():
                write_synced(staging / filename, data)
            version = self._commit(staging, tenant, name, weights, source)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._finish(AdapterRef(tenant, name, version), alias)

    def publish_dir(self, tenant: str, name: str, directory: Path, alias: str = "", source: str = "upload") -> AdapterRecord:
        """Publish the files of an upload spooled to `directory`, which they are moved out of.

        The weights' header is checked before a single tensor is read, so a file that claims
        absurd shapes or foreign tensor names costs nothing; the full validation follows.
        """
        self._check_names(tenant, name, alias)
        check_filenames(sorted(p.name for p in directory.iterdir()))
        self.validator.check_weights_header(directory / WEIGHTS_FILE)
        weights = self.validator.parse({p.name: p.read_bytes() for p in directory.iterdir()})
        staging = self._new_staging()
        try:
            for path in list(directory.iterdir()):
                moved = Path(shutil.move(path, staging / path.name))
                fsync_file(moved)
            version = self._commit(staging, tenant, name, weights, source)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._finish(AdapterRef(tenant, name, version), alias)

    def _new_staging(self) -> Path:
        self._staging_root.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self._staging_root))

    def _check_names(self, tenant: str, name: str, alias: str) -> None:
        """Before any work: a bad alias must not surface only after the version exists."""
        self._adapter_dir(tenant, name)
        if alias:
            check_name(alias, "alias")

    def _commit(self, staging: Path, tenant: str, name: str, weights: AdapterWeights, source: str) -> int:
        """The quota check and the rename that makes the version visible, with no write in between."""
        adapter_dir = self._adapter_dir(tenant, name)
        with self.quotas.reserve(tenant, Usage(bytes=_stored_bytes(staging), adapter_versions=1)):
            with self._lock:
                _make_dirs(adapter_dir)
                version = max([*self._versions(adapter_dir), self._last_version(adapter_dir)]) + 1
                while not self._claim_version(staging, AdapterRef(tenant, name, version), weights, source):
                    version += 1  # another replica sharing the store took this number first
                fsync_dir(adapter_dir)
        return version

    def _claim_version(self, staging: Path, ref: AdapterRef, weights: AdapterWeights, source: str) -> bool:
        """Renames the staged version into place as `ref`'s version; False when that directory exists
        already (a rename onto a non-empty directory fails, so two writers can never share a number)."""
        adapter_dir, version = self._adapter_dir(ref.tenant, ref.name), ref.version
        record = AdapterRecord(
            ref.tenant, ref.name, version, weights.labels, weights.rank, weights.target_modules, weights.size_bytes,
            time.time(), source, abstain_threshold=weights.abstain_threshold, abstain_label=weights.abstain_label,
        )
        write_synced(staging / RECORD_FILE, json.dumps(asdict(record)).encode())
        fsync_dir(staging)
        write_atomically(adapter_dir / VERSION_FILE, json.dumps({"last": version}).encode())
        try:
            os.rename(staging, adapter_dir / f"v{version}")
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        bump_generation(adapter_dir)
        return True

    def _finish(self, ref: AdapterRef, alias: str) -> AdapterRecord:
        if alias:
            self.set_alias(ref, alias)
        return self.get(ref)

    def _published_by(self, tenant: str, name: str, source: str) -> AdapterRecord | None:
        adapter_dir = self._adapter_dir(tenant, name)
        for version in self._versions(adapter_dir):
            record = json.loads((adapter_dir / f"v{version}" / RECORD_FILE).read_text())
            if record["source"] == source:
                return AdapterRecord(**record)
        return None

    # ----- reading ----------------------------------------------------------------------------

    def _versions(self, adapter_dir: Path) -> list[int]:
        if not adapter_dir.is_dir():
            return []
        found = ((_VERSION_DIR.fullmatch(e.name), e) for e in os.scandir(adapter_dir))
        return sorted(int(m[1]) for m, e in found if m and e.is_dir(follow_symlinks=False))

    def _last_version(self, adapter_dir: Path) -> int:
        path = adapter_dir / VERSION_FILE
        return int(json.loads(path.read_text())["last"]) if path.exists() else 0

    def _aliases(self, adapter_dir: Path) -> dict[str, int]:
        path = adapter_dir / ALIASES_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _read_view(self, tenant: str, name: str) -> AdapterView[AdapterRecord]:
        adapter_dir = self._adapter_dir(tenant, name)
        try:
            versions = self._versions(adapter_dir)
            aliases = self._aliases(adapter_dir)
        except (FileNotFoundError, NotADirectoryError):  # deleted since its stamp was read
            return AdapterView(frozenset(), None, {})
        return AdapterView(frozenset(versions), versions[-1] if versions else None, aliases)

    def _resolved(self, ref: AdapterRef) -> tuple[AdapterView[AdapterRecord], int]:
        """The adapter's current view (one `open` and one `stat` when memory has it) and the version `ref` names."""
        view = self._resolver.view(
            ref.tenant, ref.name, lambda: self._unresolved_dir(ref.tenant, ref.name),
            lambda: self._read_view(ref.tenant, ref.name),
        )
        if view is None:
            raise AdapterNotFound(f"adapter {ref} not found")
        if ref.alias:
            version = view.aliases.get(ref.alias)
        else:
            version = ref.version if ref.version is not None else view.latest
        if version is None or version not in view.versions:
            raise AdapterNotFound(f"adapter {ref} not found")
        return view, version

    def resolve(self, ref: AdapterRef) -> AdapterRef:
        """Alias or 'latest' to a concrete version; a missing anything is the same NOT_FOUND.

        Answered from memory while the adapter's stamp is unchanged, so a write acknowledged by any
        replica sharing the store (its stamp changed before it returned) is seen by this call.
        """
        _, version = self._resolved(ref)
        return AdapterRef(ref.tenant, ref.name, version)

    def resolve_published(self, ref: AdapterRef) -> tuple[AdapterRef, float]:
        """`resolve`, plus when that version was published: a name deleted and published again (by
        any replica) reuses its version numbers, and a cache keyed by version must not serve the old one."""
        view, version = self._resolved(ref)
        return AdapterRef(ref.tenant, ref.name, version), self._record(view, ref, version).created_at

    def get(self, ref: AdapterRef) -> AdapterRecord:
        """The version's record with its current aliases; the record file is read once per view."""
        view, version = self._resolved(ref)
        record = self._record(view, ref, version)
        return replace(record, aliases=sorted(a for a, v in view.aliases.items() if v == version))

    def _record(self, view: AdapterView[AdapterRecord], ref: AdapterRef, version: int) -> AdapterRecord:
        """Shared with the view: callers copy before they change it."""
        record = view.records.get(version)
        if record is None:
            path = self.version_dir(AdapterRef(ref.tenant, ref.name, version)) / RECORD_FILE
            try:
                record = AdapterRecord(**json.loads(path.read_text()))
            except FileNotFoundError:  # deleted between resolve and read
                raise AdapterNotFound(f"adapter {ref} not found") from None
            view.records[version] = record
        return record

    def read_files(self, ref: AdapterRef) -> dict[str, bytes]:
        """Only regular files of the allowed names, and never through a symlink out of the store."""
        version_dir = self.version_dir(self.resolve(ref))
        files = {}
        try:
            for path in version_dir.iterdir():
                if path.name in ALLOWED_FILES:
                    real = path.resolve()
                    if path.is_symlink() or not real.is_relative_to(self.root):
                        raise InvalidArgument(f"{ref}: {path.name} is a link out of the adapter store; refusing to read it")
                    files[path.name] = real.read_bytes()
        except FileNotFoundError:  # deleted between resolve and read
            raise AdapterNotFound(f"adapter {ref} not found") from None
        return files

    def set_alias(self, ref: AdapterRef, alias: str) -> AdapterRecord:
        check_name(alias, "alias")
        concrete = self.resolve(ref)
        adapter_dir = self._adapter_dir(ref.tenant, ref.name)
        with self._lock:
            self.resolve(concrete)  # still there: a delete may have won the lock first
            aliases = self._aliases(adapter_dir)
            aliases[alias] = concrete.version
            write_atomically(adapter_dir / ALIASES_FILE, json.dumps(aliases).encode())
            bump_generation(adapter_dir)
        return self.get(concrete)

    def _tenants(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if NAME_PATTERN.fullmatch(e.name) and e.is_dir(follow_symlinks=False))

    def _names(self, tenant: str) -> list[Path]:
        tenant_dir = self.root / tenant
        if not tenant_dir.is_dir():
            return []
        entries = (e for e in os.scandir(tenant_dir) if NAME_PATTERN.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
        return sorted((Path(e.path) for e in entries), key=lambda p: p.name)

    def list(self, tenant: str | None) -> list[AdapterRecord]:
        records = []
        for t in [check_name(tenant, "tenant")] if tenant else self._tenants():
            for adapter_dir in self._names(t):
                for version in self._versions(adapter_dir):
                    try:
                        records.append(self.get(AdapterRef(t, adapter_dir.name, version)))
                    except AdapterNotFound:
                        continue  # deleted while we listed
                    except (OSError, ValueError, TypeError):
                        log.warning("skipping %s/v%d: its record cannot be read", adapter_dir, version, exc_info=True)
        return records

    def usage(self, tenant: str | None) -> Usage:
        """Stored bytes and versions of one tenant (None: all tenants), read from the disk each time."""
        total, count = 0, 0
        for t in [tenant] if tenant else self._tenants():
            for adapter_dir in self._names(t):
                try:
                    sizes = [_stored_bytes(adapter_dir / f"v{v}") for v in self._versions(adapter_dir)]
                except FileNotFoundError:
                    sizes = self._sizes_after_a_race(adapter_dir)
                total, count = total + sum(sizes), count + len(sizes)
        return Usage(bytes=total, adapter_versions=count)

    def _sizes_after_a_race(self, adapter_dir: Path) -> list[int]:
        """A delete ran while we counted: count again under the lock, which deletes hold."""
        with self._lock:
            return [_stored_bytes(adapter_dir / f"v{v}") for v in self._versions(adapter_dir)]

    # ----- deleting ---------------------------------------------------------------------------

    def deletable(self, ref: AdapterRef, force: bool = False) -> list[AdapterRef]:
        """The versions `delete(ref, force)` would remove; raises what it would raise."""
        versions, _ = self._deletion(ref, force)
        return [AdapterRef(ref.tenant, ref.name, v) for v in versions]

    def delete(self, ref: AdapterRef, force: bool = False, expected: list[AdapterRef] | None = None) -> Deletion:
        """One version (`name@v3`) or a whole name (`name`); aliased versions only with `force`.

        Aliases go first, then the version directory is renamed out of sight and removed, so a
        reader resolves either the old state or NOT_FOUND, never a half-deleted version.
        `expected` is what `deletable` answered (and the caller cleared from the cache): a version
        published since then is never deleted unseen.
        """
        adapter_dir = self._adapter_dir(ref.tenant, ref.name)
        with self._lock:
            versions, aliases = self._deletion(ref, force)
            if expected is not None and [AdapterRef(ref.tenant, ref.name, v) for v in versions] != expected:
                raise FailedPrecondition(f"adapter {ref} changed while it was being deleted (a new version?); delete it again")
            if ref.version is None:
                self._remove(adapter_dir)
            else:
                if aliases:
                    kept = {a: v for a, v in self._aliases(adapter_dir).items() if a not in aliases}
                    write_atomically(adapter_dir / ALIASES_FILE, json.dumps(kept).encode())
                self._remove(adapter_dir / f"v{ref.version}", changed=adapter_dir)
        return Deletion([AdapterRef(ref.tenant, ref.name, v) for v in versions], aliases)

    def _deletion(self, ref: AdapterRef, force: bool) -> tuple[list[int], list[str]]:
        if ref.alias:
            raise InvalidArgument(
                f"{ref} names an alias; delete a version ('{ref.name}@v3') or the whole name ('{ref.name}'), "
                "or move the alias with SetAlias"
            )
        adapter_dir = self._adapter_dir(ref.tenant, ref.name)
        existing = self._versions(adapter_dir)
        versions = existing if ref.version is None else [v for v in existing if v == ref.version]
        if not versions:
            raise AdapterNotFound(f"adapter {ref} not found")
        aliases = self._aliases(adapter_dir)
        pointing = sorted(a for a, v in aliases.items() if v in versions)
        if pointing and not force:
            held = ", ".join(f"{a!r} points at v{aliases[a]}" for a in pointing)
            raise FailedPrecondition(
                f"adapter {ref} is still aliased ({held}); move the alias with SetAlias first, "
                "or delete with force to remove the alias too"
            )
        return versions, pointing

    def _remove(self, path: Path, changed: Path | None = None) -> None:
        """`changed`: the adapter directory whose generation moves once `path` is out of sight (a whole
        name's directory needs none: its generation file leaves with it)."""
        hidden = path.with_name(f"{DELETING_PREFIX}{path.name}-{secrets.token_hex(4)}")
        os.rename(path, hidden)
        fsync_dir(path.parent)
        if changed is not None:
            bump_generation(changed)
        shutil.rmtree(hidden, ignore_errors=True)

    def _sweep_staging(self) -> None:
        """Staging a crashed process left behind: only old entries, since another process may be publishing."""
        if not self._staging_root.is_dir():
            return
        cutoff = time.time() - STALE_STAGING_S
        for entry in os.scandir(self._staging_root):
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
