"""A real MLflow tracking server for tests: `mlflow server` on loopback, SQLite backend, artifacts in a temp dir.

Artifacts are served through the server (`--artifacts-destination`), so clients upload them over
HTTP exactly as a Ray worker on another node would. The server is started once per session (it
takes seconds) and is ready when its /health endpoint answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

NOT_INSTALLED = "the `mlflow` command is not installed (pip install 'adaptgate[tracking]')"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 3.0


def mlflow_binary() -> str | None:
    """The venv's own `mlflow` first (tests often run as .venv/bin/python without the venv on PATH)."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else shutil.which("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_server(binary: str, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server writes it for its whole life
    # No background job runner (a pool of worker processes for MLflow's own scheduled jobs): tests use none.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(url):
        try:
            code = process.wait(timeout=0.2)  # also the pause between polls
        except subprocess.TimeoutExpired:
            code = None
        if code is not None or time.monotonic() > deadline:
            stop_server(process)
            tail = (root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server did not become healthy (exit code {code}):\n{tail}")
    return process, url


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Ends the server's own process group (its uvicorn workers included); its data is thrown away anyway."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of a session-wide MLflow server; skipped only where `mlflow` is not installed."""
    binary = mlflow_binary()
    if binary is None:
        pytest.skip(NOT_INSTALLED)
    process, url = start_server(binary, tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_server(process)
