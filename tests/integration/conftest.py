"""A real gateway (real model, real Ray) on a loopback port, shared by the integration tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

READY = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(gRPC\) and :(\d+)/metrics")
HTTP_READY = re.compile(r"HTTP on https?://127\.0\.0\.1:(\d+) ")
TOKENS = {
    "acme-token": {"tenant": "acme", "admin": False},
    "globex-token": {"tenant": "globex", "admin": False},
    "admin-token": {"tenant": "ops", "admin": True},
}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Gateway:
    target: str
    metrics_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[str]
    http_url: str = ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", 64 << 20)])


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _wait_ready(proc: subprocess.Popen[str], log_path: Path, timeout: float) -> tuple[re.Match[str], str]:
    """The ready line's match, and the HTTP API's base URL ('' when the server serves none)."""
    deadline = time.monotonic() + timeout
    http_url = ""
    assert proc.stdout is not None
    with log_path.open("a") as log:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}; log in {log_path}")
            log.write(line)
            log.flush()
            if http := HTTP_READY.search(line):
                http_url = f"http://127.0.0.1:{http[1]}"
            if match := READY.search(line):
                return match, http_url
    raise RuntimeError(f"gateway not ready after {timeout}s; log in {log_path}")


@contextmanager
def running_gateway(data_dir: Path, *flags: str, log_name: str = "server.log") -> Iterator[Gateway]:
    """A real `adaptgate serve` subprocess on loopback (its own local Ray); SIGTERM on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    log_path = data_dir / log_name
    cmd = [
        sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--data-dir", str(data_dir), "--tokens-file", str(tokens), "--http-port", "0", *flags,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        match, http_url = _wait_ready(proc, log_path, timeout=240)
        _drain(proc, log_path)
        yield Gateway(f"127.0.0.1:{match[1]}", f"http://127.0.0.1:{match[2]}/metrics", data_dir, log_path, proc, http_url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway-data"), "--max-texts-per-request", "300") as gateway:
        yield gateway


def _drain(proc: subprocess.Popen[str], log_path: Path) -> None:
    """Keep reading the server's output into its log so its pipe never fills."""
    import threading

    def pump() -> None:
        assert proc.stdout is not None
        with log_path.open("a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()

    threading.Thread(target=pump, daemon=True).start()
