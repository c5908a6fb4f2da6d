"""The versioned adapter store on local disk.

Layout: `<root>/<tenant>/<name>/v<N>/` (the adapter's files plus `record.json`) and
`<root>/<tenant>/<name>/aliases.json`. A version directory appears by one atomic rename after
validation, and an alias moves by one atomic file replace, so readers never see half a write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaptgate.adapters.format import ALLOWED_FILES
from adaptgate.adapters.refs import AdapterRef, check_name
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.errors import AdapterNotFound, InvalidArgument

RECORD_FILE = "record.json"
ALIASES_FILE = "aliases.json"


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

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, self.version)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class AdapterStore:
    def __init__(self, root: Path, validator: AdapterValidator) -> None:
        self.root = root.resolve()
        self.validator = validator
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # version numbers and alias files: one writer at a time

    def _adapter_dir(self, tenant: str, name: str) -> Path:
        path = (self.root / check_name(tenant, "tenant") / check_name(name, "adapter name")).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"adapter {tenant}/{name} resolves outside the store")
        return path

    def version_dir(self, ref: AdapterRef) -> Path:
        return self._adapter_dir(ref.tenant, ref.name) / f"v{ref.version}"

    def publish(self, tenant: str, name: str, files: dict[str, bytes], alias: str = "", source: str = "upload") -> AdapterRecord:
        """Validate, then write a new version; the alias (if any) moves only once the version is complete.

        A job re-run after a gateway crash publishes with the same `job:<id>` source; it gets the
        version the first run wrote instead of a duplicate.
        """
        if source.startswith("job:") and (existing := self._published_by(tenant, name, source)) is not None:
            if alias:
                self.set_alias(existing.ref, alias)
            return self.get(existing.ref)
        weights = self.validator.parse(files)
        adapter_dir = self._adapter_dir(tenant, name)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=adapter_dir, prefix=".staging-"))
        try:
            for filename, data in files.items():
                (staging / filename).write_bytes(data)
            with self._lock:
                version = max(self._versions(adapter_dir), default=0) + 1
                record = AdapterRecord(
                    tenant, name, version, weights.labels, weights.rank, weights.target_modules,
                    weights.size_bytes, time.time(), source,
                )
                (staging / RECORD_FILE).write_text(json.dumps(asdict(record)))
                os.rename(staging, adapter_dir / f"v{version}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if alias:
            self.set_alias(AdapterRef(tenant, name, version), alias)
        return self.get(AdapterRef(tenant, name, version))

    def _published_by(self, tenant: str, name: str, source: str) -> AdapterRecord | None:
        adapter_dir = self._adapter_dir(tenant, name)
        for version in self._versions(adapter_dir):
            record = json.loads((adapter_dir / f"v{version}" / RECORD_FILE).read_text())
            if record["source"] == source:
                return AdapterRecord(**record)
        return None

    def _versions(self, adapter_dir: Path) -> list[int]:
        if not adapter_dir.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in adapter_dir.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit())

    def _aliases(self, adapter_dir: Path) -> dict[str, int]:
        path = adapter_dir / ALIASES_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def resolve(self, ref: AdapterRef) -> AdapterRef:
        """Alias or 'latest' to a concrete version; a missing anything is the same NOT_FOUND."""
        adapter_dir = self._adapter_dir(ref.tenant, ref.name)
        versions = self._versions(adapter_dir)
        if ref.alias:
            version = self._aliases(adapter_dir).get(ref.alias)
        else:
            version = ref.version if ref.version is not None else (versions[-1] if versions else None)
        if version is None or version not in versions:
            raise AdapterNotFound(f"adapter {ref} not found")
        return AdapterRef(ref.tenant, ref.name, version)

    def get(self, ref: AdapterRef) -> AdapterRecord:
        concrete = self.resolve(ref)
        version_dir = self.version_dir(concrete)
        record = AdapterRecord(**json.loads((version_dir / RECORD_FILE).read_text()))
        aliases = self._aliases(version_dir.parent)
        record.aliases = sorted(a for a, v in aliases.items() if v == concrete.version)
        return record

    def read_files(self, ref: AdapterRef) -> dict[str, bytes]:
        """Only regular files of the allowed names, and never through a symlink out of the store."""
        version_dir = self.version_dir(self.resolve(ref))
        files = {}
        for path in version_dir.iterdir():
            if path.name in ALLOWED_FILES:
                real = path.resolve()
                if path.is_symlink() or not real.is_relative_to(self.root):
                    raise InvalidArgument(f"{ref}: {path.name} is a link out of the adapter store; refusing to read it")
                files[path.name] = real.read_bytes()
        return files

    def set_alias(self, ref: AdapterRef, alias: str) -> AdapterRecord:
        check_name(alias, "alias")
        concrete = self.resolve(ref)
        adapter_dir = self._adapter_dir(ref.tenant, ref.name)
        with self._lock:
            aliases = self._aliases(adapter_dir)
            aliases[alias] = concrete.version
            _atomic_write(adapter_dir / ALIASES_FILE, json.dumps(aliases).encode())
        return self.get(concrete)

    def list(self, tenant: str | None) -> list[AdapterRecord]:
        tenants = [tenant] if tenant else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        records = []
        for t in tenants:
            tenant_dir = self.root / check_name(t, "tenant")
            names = sorted(p.name for p in tenant_dir.iterdir() if p.is_dir()) if tenant_dir.is_dir() else []
            for name in names:
                for version in self._versions(tenant_dir / name):
                    records.append(self.get(AdapterRef(t, name, version)))
        return records
