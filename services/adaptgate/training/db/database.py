"""The job database: datasets, jobs and job events, in SQLite (the embedded default) or PostgreSQL.

SQLite is one file that one control replica owns. Its one connection is shared by the event loop
and worker threads, so every statement runs under one lock: statements are tiny, and a single lock
cannot deadlock or interleave writes. A transaction is BEGIN IMMEDIATE: it takes the write lock
first, so what it read cannot change before it writes.

PostgreSQL is shared by any number of control replicas (`shared`): a small pool of connections,
checked before use (a server restart costs no request), each waiting at most the busy timeout for a
lock (`lock_timeout`). Writers that must not interleave across replicas take turns on an advisory
lock (`take_turns`); time that must mean the same to every replica (job leases) is the database's
clock (`now_sql`), never a replica's.

Either way a statement can wait (for a lock, the disk, the network), so async code calls the database
through `run`, on the database's own thread, never on the event loop. The schema is made and
upgraded by the Alembic migrations in training/db/migrations when the database is opened; on
PostgreSQL under an advisory lock, so replicas starting together do not race.

Environmental failures (full disk, a lock held too long, I/O errors, a server that cannot be
reached) become errors with a sentence an operator can act on, one table per backend; anything else
(a bug in our SQL) stays an internal error.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.pool import StaticPool

from adaptgate.errors import AdaptgateError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10  # a PostgreSQL server that does not answer fails the call after this
MIGRATION_LOCK_TIMEOUT_S = 60  # a replica starting while another migrates waits this long for it
POOL_SIZE = 4
MIGRATIONS = Path(__file__).with_name("migrations")

Params = Sequence[Any] | Mapping[str, Any]
# A Core statement, or driver SQL (the driver's own placeholders: '?' on SQLite, '%s' on PostgreSQL).
Statement = sa.Executable | str


class DatabaseFull(ResourceExhausted):
    """The volume under the database has no space left (SQLITE_FULL, PostgreSQL 53100)."""


class DatabaseBusy(Unavailable):
    """Another process held a lock longer than the busy timeout, or a concurrent write conflicted."""


class DatabaseIOError(Unavailable):
    """The database could not be written at all (an I/O error, a read-only volume or server)."""


class DatabaseUnavailable(Unavailable):
    """The PostgreSQL server cannot be reached (down, restarting, refusing this replica)."""


# ----- error tables --------------------------------------------------------------------------------

Failure = Callable[["Database"], AdaptgateError]


@dataclass(frozen=True)
class FailureSentence:
    """One environmental failure: its error type and the sentence callers see, which may name the
    database (`{db.address}`, `{db.busy_timeout_s}`), filled in when it happens."""

    error: type[AdaptgateError]
    message: str

    def __call__(self, db: Database) -> AdaptgateError:
        return self.error(self.message.format(db=db))


_full = FailureSentence(
    DatabaseFull,
    "the job database cannot be written because the disk is full; free space on the data volume and try again",
)
_locked = FailureSentence(
    DatabaseBusy, "the job database is locked by another process (waited {db.busy_timeout_s:g} s); try again shortly"
)
_conflict = FailureSentence(
    DatabaseBusy, "the job database refused a write that conflicted with a concurrent one; try again shortly"
)
_io_error = FailureSentence(
    DatabaseIOError,
    "the job database cannot be written (an I/O error on the data volume); check the volume and try again",
)
_read_only = FailureSentence(
    DatabaseIOError,
    "the job database cannot be written (the data volume is read-only); check the volume and try again",
)
_server_read_only = FailureSentence(
    DatabaseIOError,
    "the job database at {db.address} is read-only (a standby, or a read-only transaction); "
    "point the database URL at the primary server",
)
_unreachable = FailureSentence(
    DatabaseUnavailable,
    "the job database at {db.address} cannot be reached; check that PostgreSQL is running there, "
    "that this replica can connect to it, and the user, password and database name in the database URL",
)


# SQLite's primary result code (the low byte of an extended one) -> the error callers see.
SQLITE_FAILURES: dict[int, Failure] = {
    sqlite3.SQLITE_FULL: _full,
    sqlite3.SQLITE_BUSY: _locked,
    sqlite3.SQLITE_LOCKED: _locked,
    sqlite3.SQLITE_IOERR: _io_error,
    sqlite3.SQLITE_READONLY: _read_only,
}
# PostgreSQL's SQLSTATE -> the error callers see; a class ('08') covers all its codes.
POSTGRES_FAILURES: dict[str, Failure] = {
    "53100": _full,  # disk_full
    "55P03": _locked,  # lock_not_available (lock_timeout)
    "40P01": _conflict,  # deadlock_detected
    "40001": _conflict,  # serialization_failure
    "25006": _server_read_only,  # read_only_sql_transaction
    "08": _unreachable,  # connection exceptions
    "57P01": _unreachable,  # admin_shutdown
    "57P02": _unreachable,  # crash_shutdown
    "57P03": _unreachable,  # cannot_connect_now (starting up, shutting down)
}


def sqlite_failure(exc: BaseException) -> Failure | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return SQLITE_FAILURES.get(code & 0xFF) if code is not None else None


def postgres_failure(exc: BaseException) -> Failure | None:
    state = getattr(exc, "sqlstate", None)
    if state is None:  # psycopg raises OperationalError without a SQLSTATE when it cannot connect at all
        return _unreachable if isinstance(exc, psycopg.OperationalError) else None
    return POSTGRES_FAILURES.get(state) or POSTGRES_FAILURES.get(state[:2])


# ----- backends ------------------------------------------------------------------------------------


class Backend(Protocol):
    """What differs between SQLite and PostgreSQL; `Database` is the same on both."""

    dialect: str
    shared: bool
    failure: Callable[[BaseException], Failure | None]
    driver_error: type[BaseException]

    def transaction(self) -> AbstractContextManager[Connection]: ...
    def reading(self) -> AbstractContextManager[Connection]: ...
    def now(self) -> sa.ColumnElement[float]: ...
    def take_turns(self, conn: Connection, key: int) -> None: ...
    def upgrade(self, migrate: Callable[[Connection], None]) -> None: ...
    def close(self) -> None: ...


class SqliteBackend:
    """One connection in WAL mode under one lock; the driver in autocommit, transactions our own BEGINs."""

    dialect = "sqlite"
    shared = False
    failure = staticmethod(sqlite_failure)
    driver_error = sqlite3.Error

    def __init__(self, url: sa.URL, busy_timeout_s: float) -> None:
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False, "isolation_level": None}
        )
        sa.event.listen(self.engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout_s=busy_timeout_s))
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    @property
    def _conn(self) -> Connection:
        """The one connection, opened at first use (under the lock): opening it can fail like any statement."""
        if self._connection is None:
            self._connection = self.engine.connect()
        return self._connection

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._lock:
            try:
                self._conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield self._conn
                self._conn.commit()
            finally:
                self._end()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self._lock:
            try:
                yield self._conn
            finally:
                self._end()

    def _end(self) -> None:
        """Rolls back whatever is still open. SQLite has already rolled back after some errors
        (SQLITE_FULL, SQLITE_IOERR), and a failed COMMIT may leave SQLAlchemy thinking nothing is
        open: the driver's own state decides, so the next BEGIN always starts clean."""
        if self._connection is None:  # the connection could not even be opened
            return
        try:
            self._conn.rollback()  # also clears a transaction SQLAlchemy marked invalid
            raw = self._conn.connection.dbapi_connection
            if raw is not None and raw.in_transaction:
                raw.rollback()
        except (sa.exc.DBAPIError, sqlite3.Error):
            log.warning("ROLLBACK failed after an earlier error", exc_info=True)

    def now(self) -> sa.ColumnElement[float]:
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)

    def take_turns(self, conn: Connection, key: int) -> None:
        """Nothing to do: BEGIN IMMEDIATE already made this transaction the only writer."""

    def upgrade(self, migrate: Callable[[Connection], None]) -> None:
        with self.transaction() as conn:  # SQLite's DDL is transactional: the upgrade lands whole or not at all
            migrate(conn)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
            self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: object, *, busy_timeout_s: float) -> None:
    dbapi_connection.execute("PRAGMA journal_mode=WAL")
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")
    dbapi_connection.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")


class PostgresBackend:
    """A small pool of psycopg 3 connections; every transaction is the server's own."""

    dialect = "postgresql"
    shared = True
    failure = staticmethod(postgres_failure)
    driver_error = psycopg.Error

    def __init__(self, url: sa.URL, busy_timeout_s: float) -> None:
        options = url.query.get("options", "")
        lock_timeout = f"-c lock_timeout={max(1, int(busy_timeout_s * 1000))}"
        connect_args: dict[str, Any] = {
            "options": f"{options} {lock_timeout}".strip() if isinstance(options, str) else lock_timeout,
            "application_name": url.query.get("application_name", "adaptgate"),
        }
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        self.engine: Engine = sa.create_engine(
            url, pool_size=POOL_SIZE, max_overflow=POOL_SIZE, pool_pre_ping=True, connect_args=connect_args
        )

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def now(self) -> sa.ColumnElement[float]:
        return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Double)

    def take_turns(self, conn: Connection, key: int) -> None:
        """A transaction-level advisory lock: held until this transaction ends, on every replica."""
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))

    def upgrade(self, migrate: Callable[[Connection], None]) -> None:
        """One replica migrates, the others wait for it and then find the schema at head. PostgreSQL's
        DDL is transactional, so the lock, the migration and its version stamp land together."""
        with self.transaction() as conn:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT_S}s'")
            self.take_turns(conn, lock_key("adaptgate schema migration"))
            migrate(conn)

    def close(self) -> None:
        self.engine.dispose()


BACKENDS: dict[str, Callable[[sa.URL, float], Backend]] = {"sqlite": SqliteBackend, "postgresql": PostgresBackend}
# What a URL's scheme may say -> the driver we use for it (psycopg 3; SQLAlchemy's default is psycopg2).
DRIVERS = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgres": "postgresql+psycopg",
           "postgresql": "postgresql+psycopg", "postgresql+psycopg": "postgresql+psycopg"}


def database_url(target: Path | str | sa.URL) -> sa.URL:
    """A path (or a plain path string) is a SQLite file; else a URL: sqlite:///... or postgresql://..."""
    if isinstance(target, Path) or (isinstance(target, str) and "://" not in target):
        return sa.URL.create("sqlite", database=str(target))
    url = sa.make_url(target)
    driver = DRIVERS.get(url.drivername)
    if driver is None:
        raise ValueError(f"database URL scheme {url.drivername!r} is not supported; use sqlite:///<file> or postgresql://")
    return url.set(drivername=driver)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name`, the same on every replica."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


# Alembic keeps the running migration's context in a module global: one migration at a time per process.
_MIGRATING = threading.Lock()


def upgrade_schema(conn: Connection) -> None:
    """Runs the migrations up to head on `conn` (inside the caller's transaction). No alembic.ini:
    the configuration is made here, so nothing but the package's .py files is needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    with _MIGRATING:
        command.upgrade(config, "head")


# ----- the database --------------------------------------------------------------------------------


class Database:
    """The job database the stores write their SQL through, on SQLite or PostgreSQL."""

    def __init__(self, target: Path | str | sa.URL, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.url = database_url(target)
        self.busy_timeout_s = busy_timeout_s
        backend = BACKENDS[self.url.get_backend_name()]
        self._backend = backend(self.url, busy_timeout_s)  # connects at first use: the upgrade below
        # One thread for async callers: on SQLite statements are serialized by the lock anyway, and a
        # caller stuck behind another process's lock then never holds a thread of the shared default pool.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptgate-db")
        try:
            with self._errors():
                self._backend.upgrade(upgrade_schema)
        except BaseException:
            self.close()
            raise

    @property
    def dialect(self) -> str:
        return self._backend.dialect

    @property
    def shared(self) -> bool:
        """True where other replicas may write the same database (PostgreSQL)."""
        return self._backend.shared

    @property
    def path(self) -> Path | None:
        """The SQLite file; None on PostgreSQL."""
        return Path(self.url.database or "") if self.dialect == "sqlite" else None

    @property
    def address(self) -> str:
        """Where the database is, for messages: host:port, or the SQLite file (never a password)."""
        if self.dialect == "sqlite":
            return str(self.path)
        host = self.url.host or self.url.query.get("host") or "localhost"  # ?host=/run/postgresql: a socket directory
        return f"{host}:{self.url.port or 5432}"

    def now_sql(self) -> sa.ColumnElement[float]:
        """The database's clock in epoch seconds, as SQL: the one clock every replica agrees on."""
        return self._backend.now()

    def take_turns(self, conn: Connection, name: str) -> None:
        """Transactions that call this with the same `name` run one after another, on every replica,
        until the calling transaction ends."""
        self._backend.take_turns(conn, lock_key(name))

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            raise self._translated(exc.orig if exc.orig is not None else exc, exc) from exc
        except self._backend.driver_error as exc:
            raise self._translated(exc, exc) from exc

    def _translated(self, cause: BaseException, raised: BaseException) -> BaseException:
        """The error to raise: a sentence for environmental failures, `raised` itself for anything else."""
        make = self._backend.failure(cause)
        if make is None:
            return raised
        error = make(self)
        log.warning("%s (%s: %s)", error.message, self.dialect, cause)
        return error

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the database's thread: the event loop never waits for a lock, the disk or the network."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Several statements that land together or not at all (a job update and its event). On
        SQLite the write lock is taken first (BEGIN IMMEDIATE); on PostgreSQL it is a normal transaction."""
        with self._errors(), self._backend.transaction() as conn:
            yield conn

    def execute(self, statement: Statement, params: Params = ()) -> int:
        """One write statement; returns the number of rows it changed."""
        with self.transaction() as conn:
            return _execute(conn, statement, params).rowcount

    def query(self, statement: Statement, params: Params = ()) -> list[Row[Any]]:
        with self._errors(), self._backend.reading() as conn:
            return list(_execute(conn, statement, params).fetchall())

    def query_one(self, statement: Statement, params: Params = ()) -> Row[Any] | None:
        with self._errors(), self._backend.reading() as conn:
            return _execute(conn, statement, params).first()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._backend.close()


def _execute(conn: Connection, statement: Statement, params: Params = ()) -> sa.CursorResult[Any]:
    if not isinstance(statement, str):
        return conn.execute(statement, dict(params) if params else None)  # type: ignore[arg-type]
    if not params:
        return conn.exec_driver_sql(statement)
    return conn.exec_driver_sql(statement, tuple(params) if isinstance(params, Sequence) else dict(params))


def open_database(database_url: str, sqlite_path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Database:
    """The composition root's database: `database_url` when set, else the SQLite file at `sqlite_path`."""
    return Database(database_url or sqlite_path, busy_timeout_s)
