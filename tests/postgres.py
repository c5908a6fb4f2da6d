"""A throwaway PostgreSQL server for tests: real SQL, real locks, real connection failures, no mocks.

The server runs from the installed binaries (Debian's `postgresql` package puts them under
/usr/lib/postgresql/<version>/bin) in a temporary directory: trust authentication on 127.0.0.1, a
free port, its unix socket in that directory, and no fsync (a test database need not survive a
power cut). PostgreSQL refuses to run as root, so under root it runs as the `postgres` user.
Each test gets a database of its own (`create_database`), so tests never see each other's rows.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

NOT_INSTALLED = "PostgreSQL is not installed (apt-get install postgresql)"
SERVER_USER = "postgres"  # the cluster's superuser (initdb -U), and the OS user that runs it under root
START_TIMEOUT_S = 60


def binaries() -> Path | None:
    """The newest installed server's bin directory (initdb and pg_ctl), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: _version(Path(d)), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in map(Path, candidates):
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _version(bindir: Path) -> tuple[int, ...]:
    name = bindir.parent.name
    return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One cluster in a temp directory; `url` is its maintenance database, `stop` throws it away."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="adaptgate-pg-"))
        if self.as_root:
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
        self.data = self.root / "data"
        self.port = 0

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}{done.stdout}{log}")

    def start(self) -> PostgresServer:
        """Creates the cluster on first start; later starts (after `halt`) keep its data and port."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
            self.port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
        return self

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{name}"

    def halt(self, fast: bool = False) -> None:
        """Stops the server (clients see their connections drop), keeping its data for `start`; `fast`
        also keeps the last commits (with synchronous_commit off an immediate stop may lose them)."""
        self._run("pg_ctl", "-D", str(self.data), "stop", "-m", "fast" if fast else "immediate")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.halt()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A new, empty database on the server at `server_url`; returns its URL."""
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name
