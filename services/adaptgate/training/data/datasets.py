"""Tenant datasets: validated at upload, stored as normalized JSONL, recorded in the job database (SQLite or PostgreSQL).

The stored file always has `{"text", "label"}` rows whatever the upload's format and field
names were, so training reads one format. Another tenant's dataset answers exactly like a
missing one (NOT_FOUND), so ids leak nothing. Datasets count against their tenant's storage quota
(`size_bytes`, the upload's size, and their number); a delete frees it at once.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from adaptgate.errors import FailedPrecondition, InvalidArgument, NotFound
from adaptgate.quotas import StorageQuotas, Usage
from adaptgate.storage import Storage
from adaptgate.training.data.checks import MAX_CONFLICT_FRACTION, ParsedDataset, parse_dataset, parse_dataset_file
from adaptgate.training.db.database import Database
from adaptgate.training.db.schema import datasets, jobs
from adaptgate.training.jobs.records import ACTIVE_STATES

__all__ = ["DatasetRecord", "DatasetStore", "ParsedDataset", "parse_dataset"]

MAX_NAME_CHARS = 128
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole string (fullmatch): '$' would let a trailing newline through
S = TypeVar("S")
# parse_dataset (bytes) or parse_dataset_file (a path): (source, fmt, text_field, label_field, max_labels, max_conflict_fraction).
Parser = Callable[[S, str, str, str, int | None, float], ParsedDataset]


@dataclass
class DatasetRecord:
    id: str
    tenant: str
    name: str
    rows: int
    label_counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    created_at: float = 0.0
    size_bytes: int = 0


def new_dataset_id() -> str:
    return "ds-" + secrets.token_hex(6)


def check_name(name: str) -> None:
    if not name.strip():
        raise InvalidArgument("dataset name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"dataset name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")


def check_tenant(tenant: str) -> None:
    """Tenants name directories, so only path-safe names are accepted."""
    if not TENANT_PATTERN.fullmatch(tenant) or tenant in (".", ".."):
        raise InvalidArgument(f"tenant {tenant!r} cannot own datasets: use letters, digits, '_', '.', '-'")


def jsonl_lines(parsed: ParsedDataset) -> Iterator[bytes]:
    """The normalized file one row at a time, so a large dataset is never one big string."""
    for text, label in zip(parsed.texts, parsed.labels):
        yield (json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n").encode()


def _relative_path(record: DatasetRecord) -> str:
    """Where a dataset's file lies under the store's root (kept in its row as `path`)."""
    return f"{record.tenant}/{record.id}.jsonl"


def normalized_jsonl(parsed: ParsedDataset) -> bytes:
    return b"".join(jsonl_lines(parsed))


def _record(row: Mapping[str, Any]) -> DatasetRecord:
    return DatasetRecord(
        id=row["id"], tenant=row["tenant"], name=row["name"], rows=row["rows"],
        label_counts=json.loads(row["label_counts"]), warnings=json.loads(row["warnings"]),
        created_at=row["created_at"], size_bytes=row["size_bytes"],
    )


class DatasetStore:
    """Datasets under `root/<tenant>/<id>.jsonl` on storage every control replica shares (a path or a
    storage URI, storage.py), their records in the shared database.

    Methods are synchronous (parsing a large upload is CPU work): call them via
    asyncio.to_thread from the event loop.
    """

    def __init__(
        self, root: Storage | str | os.PathLike[str], db: Database, max_labels: int | None = None,
        quotas: StorageQuotas | None = None, max_conflict_fraction: float = MAX_CONFLICT_FRACTION,
    ) -> None:
        self.root = root if isinstance(root, Storage) else Storage(root)
        self.db = db
        self.max_labels = max_labels
        self.max_conflict_fraction = max_conflict_fraction
        self.quotas = quotas or StorageQuotas()
        self.quotas.track(self.usage)

    def create(
        self, tenant: str, name: str, fmt: str, data: bytes, text_field: str = "text", label_field: str = "label"
    ) -> DatasetRecord:
        parsed = self._parse(tenant, name, parse_dataset, data, fmt, text_field, label_field)
        return self._store(tenant, name, parsed, len(data))

    def create_from_file(
        self, tenant: str, name: str, fmt: str, path: Path, text_field: str = "text", label_field: str = "label"
    ) -> DatasetRecord:
        """An upload spooled to disk, parsed row by row: it is never one big bytes or str in memory."""
        parsed = self._parse(tenant, name, parse_dataset_file, path, fmt, text_field, label_field)
        return self._store(tenant, name, parsed, path.stat().st_size)

    def _parse(
        self, tenant: str, name: str, parse: Parser[S], source: S, fmt: str, text_field: str, label_field: str
    ) -> ParsedDataset:
        """The names are checked before a row is read; the rows within this store's label and conflict limits."""
        check_tenant(tenant)
        check_name(name)
        return parse(source, fmt, text_field, label_field, self.max_labels, self.max_conflict_fraction)

    def _store(self, tenant: str, name: str, parsed: ParsedDataset, size_bytes: int) -> DatasetRecord:
        """The file first, then the quota check and the row (the commit) with no other write of this
        tenant in between; a refused or failed insert removes the file."""
        self.quotas.check(tenant, Usage(bytes=size_bytes, datasets=1))  # early: skip writing what cannot fit
        record = DatasetRecord(
            id=new_dataset_id(), tenant=tenant, name=name, rows=len(parsed.texts),
            label_counts=parsed.label_counts, warnings=parsed.warnings, created_at=time.time(), size_bytes=size_bytes,
        )
        file = self._file(record)
        file.write_chunks(jsonl_lines(parsed))
        try:
            with self.quotas.reserve(tenant, Usage(bytes=size_bytes, datasets=1)):
                self._insert(record)
        except BaseException:
            file.remove_tree()
            raise
        return record

    def usage(self, tenant: str | None) -> Usage:
        """What the tenant's datasets (None: everyone's) hold, from the table: exact after every delete."""
        statement = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(datasets.c.size_bytes), 0))
        if tenant is not None:
            statement = statement.where(datasets.c.tenant == tenant)
        row = self.db.query_one(statement)
        return Usage(bytes=int(row[1]), datasets=int(row[0])) if row else Usage()

    def delete(self, tenant: str | None, dataset_id: str) -> DatasetRecord:
        """Removes the record, then the file; refused while a queued or running job trains or validates on it.

        The job check and the delete are one transaction, so a job that is already recorded as
        QUEUED can never lose its dataset. tenant None is the admin view.
        """
        states = [s.value for s in ACTIVE_STATES]
        with self.db.transaction() as conn:
            row = conn.execute(sa.select(datasets).where(datasets.c.id == dataset_id)).mappings().first()
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise NotFound(f"dataset {dataset_id!r} not found")
            active = conn.execute(
                sa.select(jobs.c.id, jobs.c.dataset_id, jobs.c.options).where(jobs.c.state.in_(states)).order_by(jobs.c.created_at)
            ).all()  # few (capped per tenant and in all); a validation dataset is named in the options
            users = [job for job, trains_on, options in active
                     if dataset_id in (trains_on, json.loads(options or "{}").get("validation_dataset_id"))]
            if users:
                names = ", ".join(users)
                raise FailedPrecondition(
                    f"dataset {dataset_id!r} is in use by {len(users)} queued or running job(s) ({names}); "
                    "cancel them or wait for them to finish, then delete it"
                )
            conn.execute(sa.delete(datasets).where(datasets.c.id == dataset_id))
        record = _record(row)
        self._file(record).remove_tree()
        return record

    def _insert(self, record: DatasetRecord) -> None:
        self.db.execute(datasets.insert().values(
            id=record.id, tenant=record.tenant, name=record.name, rows=record.rows,
            label_counts=json.dumps(record.label_counts), warnings=json.dumps(record.warnings),
            created_at=record.created_at, size_bytes=record.size_bytes, path=_relative_path(record),
        ))

    def _file(self, record: DatasetRecord) -> Storage:
        return self.root.child(*_relative_path(record).split("/"))

    def get(self, tenant: str | None, dataset_id: str) -> DatasetRecord:
        """tenant None is the admin view; another tenant's dataset is 'not found', like a missing one."""
        row = self.db.query_one(sa.select(datasets).where(datasets.c.id == dataset_id))
        if row is None or (tenant is not None and row.tenant != tenant):
            raise NotFound(f"dataset {dataset_id!r} not found")
        return _record(row._mapping)

    def load(self, record: DatasetRecord) -> tuple[list[str], list[str]]:
        """Texts and labels of a stored dataset, in upload order."""
        file = self._file(record)
        if not file.exists():
            raise NotFound(f"the file of dataset {record.id!r} is missing from the store")
        rows = [json.loads(line) for line in file.lines() if line]
        return [r["text"] for r in rows], [r["label"] for r in rows]

    def list(self, tenant: str | None) -> builtins.list[DatasetRecord]:
        statement = sa.select(datasets).order_by(datasets.c.created_at, datasets.c.id)
        if tenant is not None:
            statement = statement.where(datasets.c.tenant == tenant)
        return [_record(row._mapping) for row in self.db.query(statement)]
