"""Embedding throughput over our HTTP API (`POST /v1/embeddings`) beside our gRPC `Embed` and Infinity's HTTP server.

The workload is bench/run.py's: the same texts, `--batch` texts per request, `--concurrency` clients, an
untimed warm-up request, one cold pass, then `--passes` timed passes whose median is the figure. One
gateway serves both of our APIs; within each pass the systems take turns every few requests per client
(the order rotating), so a change in the load of a shared machine reaches all of them alike. Both HTTP
servers are driven by the same client (one keep-alive httpx pool), in each of `--encodings`: `float`
(JSON numbers, what curl or a plain `requests` user gets) and `base64` (what the `openai` package asks
for by default). Prints req/s and texts/s per system and the ratios, each HTTP row against gRPC and
against Infinity in the same encoding.

Infinity runs from its own venv, never .venv (its pins differ from ours): .venv-peers, which `make bench`
builds as bench/run.py needs it; without it, its rows are skipped and say why. It is given the packaged
model's directory, offline. Not a test.

The file is not named http.py: `python bench/http.py` puts bench/ first on sys.path, and then every
`import http.client` (urllib, requests, grpc's deps) would import that script instead of the standard library.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
INFINITY_VENVS = (REPO / ".venv-peers",)
INFINITY_PORT = 7997


@dataclass
class System:
    """One server under test: its per-request call, and the rates and latencies of its passes."""

    name: str
    call: Callable[[list[str]], None]
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def run_slice(self, chunks: list[list[str]], concurrency: int, timed: bool) -> float:
        """Sends `chunks` from `concurrency` clients; returns the seconds it took."""
        from concurrent.futures import ThreadPoolExecutor

        def one(chunk: list[str]) -> None:
            started = time.perf_counter()
            self.call(chunk)
            if timed:
                self.latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, chunks))
        return time.perf_counter() - started

    @property
    def texts_per_s(self) -> float:
        return float(np.median(self.rates[1:]))


def run_pass(systems: list[System], chunks: list[list[str]], concurrency: int, timed: bool) -> None:
    """One pass over the texts for every system, taken in turns slice by slice (a few requests per client,
    the order rotating), so that another process's burst of load lands on all of them alike."""
    step = 2 * concurrency
    seconds = dict.fromkeys(range(len(systems)), 0.0)
    for k, start in enumerate(range(0, len(chunks), step)):
        for i in [(k + j) % len(systems) for j in range(len(systems))]:
            seconds[i] += systems[i].run_slice(chunks[start : start + step], concurrency, timed)
    for i, system in enumerate(systems):
        system.rates.append(sum(len(c) for c in chunks) / seconds[i])


def decode(data: list[dict[str, object]]) -> np.ndarray:
    """Either encoding back to a float32 matrix, as a client would use it."""
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)  # type: ignore[arg-type]
            else np.asarray(d["embedding"], dtype=np.float32) for d in data]
    return np.stack(rows)


def http_call(client: httpx.Client, url: str, model: str, encoding: str, token: str | None) -> Callable[[list[str]], None]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(chunk: list[str]) -> None:
        response = client.post(url, json={"model": model, "input": chunk, "encoding_format": encoding}, headers=headers)
        response.raise_for_status()
        assert decode(response.json()["data"]).shape[0] == len(chunk)

    return call


def infinity_binary(explicit: Path | None) -> tuple[Path | None, str]:
    """The infinity_emb to run, or None and why there is none."""
    candidates = [explicit] if explicit is not None else [v / "bin" / "infinity_emb" for v in INFINITY_VENVS]
    for binary in candidates:
        if binary.exists():
            return binary, ""
    return None, f"no infinity_emb at {' or '.join(str(c) for c in candidates)} (see the docstring to install it)"


def report(system: System, batch: int, tokens_per_text: float) -> None:
    rate = system.texts_per_s
    p50, p99 = np.percentile(system.latencies, 50) * 1000, np.percentile(system.latencies, 99) * 1000
    print(f"{system.name:28s} {rate / batch:7.1f} req/s {rate:8.1f} texts/s {rate * tokens_per_text:8.0f} tokens/s  "
          f"p50 {p50:4.0f} ms  p99 {p99:4.0f} ms  (cold pass {system.rates[0]:.1f} texts/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5, help="timed passes per system (the median is reported)")
    parser.add_argument("--encodings", default="float,base64", help="encoding_format values over HTTP, comma-separated")
    parser.add_argument("--infinity", type=Path, default=None, help="an infinity_emb binary (default: its venvs)")
    parser.add_argument("--no-infinity", action="store_true", help="leave Infinity out")
    args = parser.parse_args()
    import run  # its workload and server starters: both benches measure the same thing (bench/ is on sys.path)
    texts = run.load_texts(args.texts)
    tokens_per_text = run.token_count(texts) / len(texts)
    chunks = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    print(f"{len(texts)} texts, {tokens_per_text:.1f} tokens each on average; {args.concurrency} clients x "
          f"{args.batch} texts; median of {args.passes} passes; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    binary, why = (None, "--no-infinity") if args.no_infinity else infinity_binary(args.infinity)
    procs: list[subprocess.Popen[str]] = []
    pool = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=args.concurrency))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            systems = start_systems(run, Path(tmp), binary, pool, args.encodings.split(","), procs)
            if binary is None:
                print(f"Infinity: skipped: {why}")
            for system in systems:
                system.call(chunks[0])  # untimed: connections, first kernels
            for n in range(1 + args.passes):
                run_pass(systems, chunks, args.concurrency, timed=n > 0)
                rates = ", ".join(f"{s.name} {s.rates[-1]:.0f}" for s in systems)
                print(f"{'cold pass' if n == 0 else f'pass {n}'} (texts/s): {rates}", flush=True)
        finally:
            pool.close()
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    for system in systems:
        report(system, args.batch, tokens_per_text)
    ratios(systems, args.encodings.split(","))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def ratios(systems: list[System], encodings: list[str]) -> None:
    rate = {s.name: s.texts_per_s for s in systems}
    grpc = rate[GRPC]
    for encoding in encodings:
        ours, theirs = rate[ours_name(encoding)], rate.get(infinity_name(encoding))
        print(f"ratio adaptgate HTTP ({encoding}) / adaptgate gRPC: {ours / grpc:.2f}x (target >= 0.9x)")
        if theirs is not None:
            print(f"ratio adaptgate HTTP ({encoding}) / Infinity HTTP ({encoding}): {ours / theirs:.2f}x (target >= 3x); "
                  f"adaptgate gRPC / Infinity HTTP ({encoding}): {grpc / theirs:.2f}x")


GRPC = "adaptgate gRPC Embed"


def ours_name(encoding: str) -> str:
    return f"adaptgate HTTP ({encoding})"


def infinity_name(encoding: str) -> str:
    return f"Infinity HTTP ({encoding})"


def start_systems(
    run: ModuleType, tmp: Path, binary: Path | None, pool: httpx.Client, encodings: list[str],
    procs: list[subprocess.Popen[str]],
) -> list[System]:
    """One gateway (gRPC and HTTP), and Infinity when there is one; `procs` collects what to stop."""
    from adaptgate.client import Client
    from adaptgate.engine.model import packaged_model_dir

    started = time.perf_counter()
    proc, target, http_url = start_gateway(tmp)
    procs.append(proc)
    print(f"gateway cold start: {time.perf_counter() - started:.1f}s")
    client = Client(target, "bench")
    model = client.embed(["x"]).model
    systems = [System(GRPC, lambda chunk: client.embed_array(chunk, truncate=True))]
    url = f"{http_url}/v1/embeddings"
    systems += [System(ours_name(e), http_call(pool, url, model, e, "bench")) for e in encodings]
    if binary is not None:
        started = time.perf_counter()
        procs.append(run.start_infinity(binary, INFINITY_PORT))
        drain(procs[-1])  # its access log, a line a request, would fill the pipe and stall it
        print(f"Infinity cold start: {time.perf_counter() - started:.1f}s ({binary})")
        url, model = f"http://127.0.0.1:{INFINITY_PORT}/embeddings", str(packaged_model_dir())
        systems += [System(infinity_name(e), http_call(pool, url, model, e, None)) for e in encodings]
    return systems


def start_gateway(tmp: Path) -> tuple[subprocess.Popen[str], str, str]:
    """bench/run.py's gateway command; returns it with its gRPC target and its HTTP API's base URL."""
    import json
    import re
    import sys

    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"bench": {"tenant": "bench"}}}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--http-port", "0", "--data-dir", str(tmp), "--tokens-file", str(tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    http_url = ""
    for line in proc.stdout:  # the HTTP line comes first, then the gRPC one
        if match := re.search(r"HTTP on (http://127\.0\.0\.1:\d+)", line):
            http_url = match[1]
        if (match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line)) and http_url:
            drain(proc)
            return proc, f"127.0.0.1:{match[1]}", http_url
    raise RuntimeError(f"the gateway exited with {proc.wait()} before serving gRPC and HTTP")


def drain(proc: subprocess.Popen[str]) -> None:
    """Keep reading the server's output so its pipe never fills and blocks it."""
    import threading

    def pump() -> None:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass

    threading.Thread(target=pump, daemon=True).start()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
