"""Bounded load against a gateway: rising request rates, then stop; throughput, p50/p99, errors by status.

    .venv/bin/python bench/load.py                       # starts its own loopback gateway
    .venv/bin/python bench/load.py --target host:50051 --token T
    .venv/bin/python bench/load.py --soak 1000          # resident memory over adapter load/unload cycles
    .venv/bin/python bench/load.py --scenario overload  # goodput of clients retrying at once at 4x the knee
    .venv/bin/python bench/load.py --scenario fairness  # a light tenant's latency while another floods
    .venv/bin/python bench/load.py --scenario both --phase-seconds 20   # both, one knee (about 2 minutes)

Each step offers a fixed rate of Embed requests (open loop: requests are sent on schedule whether
or not earlier ones finished) for a few seconds; a step's results show where the knee is and that
beyond it the server answers RESOURCE_EXHAUSTED quickly instead of queueing forever.

The scenarios run against a gateway with the operator defaults (its own, or --target with
--token/--light-token for two tenants). First the knee: a few closed-loop clients of the heavy
tenant keep the engine busy; their goodput is the peak and their request rate the knee rate.
`overload`: requests arrive at 4x the knee rate and each one that is refused (RESOURCE_EXHAUSTED)
is sent again at once, without backoff, until it succeeds or its 10 s deadline passes; goodput vs
the peak shows whether refusals stay cheap. `fairness`: a light tenant sends 8-text requests one at
a time, alone and then while the heavy tenant floods as in `overload`; its p50/p99 and errors in
both phases, and the total goodput with and without the flood. The flood runs in its own process,
so its client work never delays the light tenant's timing loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import grpc
import numpy as np

from adaptgate.v1 import adapters_pb2, adapters_pb2_grpc, embeddings_pb2, embeddings_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
HEAVY_TOKEN, LIGHT_TOKEN = "heavy-token", "light-token"
# Two tenants for the scenarios; "load" keeps the rate sweep's tenant of its own.
TOKENS = {"load": {"tenant": "load"}, HEAVY_TOKEN: {"tenant": "heavy"}, LIGHT_TOKEN: {"tenant": "light"}}
RETRIED = {"RESOURCE_EXHAUSTED"}
ATTEMPT_DEADLINE_S = 10.0


async def one(stub, request, metadata, latencies: list[float], codes: Counter) -> None:
    started = time.perf_counter()
    try:
        await stub.Embed(request, metadata=metadata, timeout=10)
        codes["OK"] += 1
        latencies.append(time.perf_counter() - started)
    except grpc.aio.AioRpcError as exc:
        codes[exc.code().name] += 1


async def step(target: str, token: str, rate: float, seconds: float, texts: list[str]) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
        request = embeddings_pb2.EmbedRequest(texts=texts, truncate=True, encoding=embeddings_pb2.ENCODING_BYTES_F32)
        metadata = (("authorization", f"Bearer {token}"),)
        latencies: list[float] = []
        codes: Counter = Counter()
        tasks = []
        started = time.perf_counter()
        for k in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + k / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(stub, request, metadata, latencies, codes)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    p = np.percentile(latencies, [50, 99]) * 1000 if latencies else [float("nan")] * 2
    return {"rate": rate, "texts_per_s": codes["OK"] * len(texts) / elapsed, "p50_ms": p[0], "p99_ms": p[1], "codes": dict(codes)}


def embed_request(texts: list[str]) -> embeddings_pb2.EmbedRequest:
    return embeddings_pb2.EmbedRequest(texts=texts, truncate=True, encoding=embeddings_pb2.ENCODING_BYTES_F32)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Tally:
    """What one load generator saw: answered requests and texts, and every attempt's status code."""

    requests: int = 0
    texts: int = 0
    seconds: float = 0.0  # the phase: answers after it do not count
    codes: Counter = field(default_factory=Counter)  # one count per attempt, retries included
    latencies: list[float] = field(default_factory=list)  # first attempt to answer, per answered request

    @property
    def goodput(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    def percentiles_ms(self) -> tuple[float, float]:
        if not self.latencies:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(self.latencies, [50, 99]) * 1000
        return float(p50), float(p99)


async def retrying(stub, request, metadata, texts: int, tally: Tally, until: float) -> None:
    """One client request, sent again at once while it is refused with RESOURCE_EXHAUSTED; only answers
    that arrive before `until` (the end of the phase) count, so every phase lasts exactly its seconds."""
    arrived = time.perf_counter()
    deadline = arrived + ATTEMPT_DEADLINE_S
    while (remaining := deadline - time.perf_counter()) > 0:
        try:
            await stub.Embed(request, metadata=metadata, timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            tally.codes[exc.code().name] += 1
            if exc.code().name in RETRIED:
                continue
            return
        if time.perf_counter() <= until:
            tally.codes["OK"] += 1
            tally.requests += 1
            tally.texts += texts
            tally.latencies.append(time.perf_counter() - arrived)
        return


async def until_end(tasks: list[asyncio.Task], until: float) -> None:
    """The phase ends at `until`: what is still in flight then is cancelled (and counts for nothing)."""
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, until - time.perf_counter()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def closed_loop(target: str, token: str, texts: list[str], clients: int, seconds: float) -> Tally:
    """`clients` callers, each sending its next request as soon as the last is answered (or refused)."""
    tally = Tally(seconds=seconds)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
        request, metadata = embed_request(texts), auth(token)
        until = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < until:
                await retrying(stub, request, metadata, len(texts), tally, until)

        await until_end([asyncio.create_task(client()) for _ in range(clients)], until)
    return tally


async def flood(target: str, token: str, texts: list[str], rate: float, seconds: float) -> Tally:
    """Open loop at `rate` requests/s; every refused request is retried at once (no backoff)."""
    tally = Tally(seconds=seconds)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
        request, metadata = embed_request(texts), auth(token)
        started = time.perf_counter()
        until = started + seconds
        tasks = []
        for k in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + k / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(retrying(stub, request, metadata, len(texts), tally, until)))
        await until_end(tasks, until)
    return tally


def flood_process(target: str, token: str, texts: list[str], rate: float, seconds: float) -> Tally:
    return asyncio.run(flood(target, token, texts, rate, seconds))


async def light_while(target: str, token: str, texts: list[str], seconds: float, flood_rate: float,
                      flood_token: str, flood_texts: list[str]) -> tuple[Tally, Tally | None]:
    """The light tenant's closed loop (one request at a time), with a flood in another process if flood_rate."""
    if not flood_rate:
        return await closed_loop(target, token, texts, 1, seconds), None
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        await loop.run_in_executor(pool, time.sleep, 0)  # the child is up before the clock starts
        flooding = loop.run_in_executor(pool, flood_process, target, flood_token, flood_texts, flood_rate, seconds)
        light = await closed_loop(target, token, texts, 1, seconds)
        return light, await flooding


def run_flood(target: str, token: str, texts: list[str], rate: float, seconds: float) -> Tally:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(flood_process, target, token, texts, rate, seconds).result()


def knee(target: str, token: str, texts: list[str], clients: int, seconds: float) -> tuple[float, float]:
    """Peak goodput (texts/s) and the knee rate (requests/s) of `clients` closed-loop heavy clients."""
    tally = asyncio.run(closed_loop(target, token, texts, clients, seconds))
    print(f"knee: {clients} clients x {len(texts)} texts: {tally.goodput:.0f} texts/s, "
          f"{tally.requests / tally.seconds:.1f} req/s, p50/p99 {'/'.join(f'{v:.0f}' for v in tally.percentiles_ms())} ms, "
          f"codes {dict(tally.codes)}", flush=True)
    return tally.goodput, tally.requests / tally.seconds


def overload_scenario(target: str, token: str, texts: list[str], peak: float, rate: float, seconds: float) -> None:
    tally = run_flood(target, token, texts, 4 * rate, seconds)
    goodput = tally.goodput
    attempts = sum(tally.codes.values())
    print(f"overload: {4 * rate:.1f} req/s offered (4x the knee), retried at once when refused: goodput "
          f"{goodput:.0f} texts/s = {goodput / peak:.0%} of the peak {peak:.0f} (target >= 90%: "
          f"{_verdict(goodput >= 0.9 * peak)}); "
          f"{attempts / tally.seconds:.0f} attempts/s, codes {dict(tally.codes)}", flush=True)


def fairness_scenario(target: str, heavy: str, light: str, heavy_texts: list[str], light_texts: list[str],
                      peak: float, rate: float, seconds: float) -> None:
    quiet, _ = asyncio.run(light_while(target, light, light_texts, seconds, 0, heavy, heavy_texts))
    loud, flooded = asyncio.run(light_while(target, light, light_texts, seconds, 4 * rate, heavy, heavy_texts))
    assert flooded is not None
    q50, q99 = quiet.percentiles_ms()
    f50, f99 = loud.percentiles_ms()
    errors = sum(n for code, n in loud.codes.items() if code != "OK") + sum(n for c, n in quiet.codes.items() if c != "OK")
    total = flooded.goodput + loud.goodput
    print(f"fairness: light tenant, {len(light_texts)} texts one at a time: quiet p50/p99 {q50:.0f}/{q99:.0f} ms "
          f"({quiet.requests} answers); flooded p50/p99 {f50:.0f}/{f99:.0f} ms ({loud.requests} answers, codes "
          f"{dict(loud.codes)}); errors {errors} (target 0: {_verdict(errors == 0)}); flooded p99 target "
          f"<= {4 * q99 + 100:.0f} ms ({_verdict(f99 <= 4 * q99 + 100)})", flush=True)
    print(f"fairness: total goodput at the knee {peak:.0f} texts/s without the flood, {total:.0f} with it "
          f"(heavy {flooded.goodput:.0f}, codes {dict(flooded.codes)})", flush=True)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def resident_bytes(metrics_url: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)[1])


def soak(target: str, token: str, metrics_url: str, cycles: int, warmup: int = 50) -> None:
    """Upload one head-only adapter, then load and unload it `cycles` times; print the server's RSS growth."""
    import torch

    from adaptgate.adapters.format import head_only_files

    files = head_only_files(torch.randn(2, 384) * 0.01, torch.zeros(2), ["ham", "spam"], "", "bench/load.py soak")
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        chunks = [adapters_pb2.UploadAdapterChunk(name="soak")]
        chunks += [adapters_pb2.UploadAdapterChunk(filename=name, data=data) for name, data in files.items()]
        ref = stub.UploadAdapter(iter(chunks), metadata=metadata).ref

        def cycle() -> None:
            stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(ref=ref), metadata=metadata)
            stub.UnloadAdapter(adapters_pb2.AdapterRef(ref=ref), metadata=metadata)

        for _ in range(warmup):
            cycle()
        before, started = resident_bytes(metrics_url), time.perf_counter()
        for _ in range(cycles):
            cycle()
        after = resident_bytes(metrics_url)
    print(f"{cycles} load/unload cycles of {ref} in {time.perf_counter() - started:.1f} s: resident memory "
          f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB (growth {(after - before) / 2**20:+.1f} MiB after {warmup} warm-up cycles)")


SWEEP_FLAGS = ("--max-queue-texts", "512", "--max-inflight-per-tenant", "0")


def start_server(data_dir: Path, flags: tuple[str, ...] = SWEEP_FLAGS) -> tuple[subprocess.Popen[str], str, str, str]:
    """A loopback gateway; the rate sweep narrows its queue so that the knee shows early, the scenarios keep defaults."""
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--data-dir", str(data_dir), "--tokens-file", str(tokens), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+) \(gRPC\) and :(\d+)/metrics", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe from filling
            return proc, f"127.0.0.1:{match[1]}", "load", f"http://127.0.0.1:{match[2]}/metrics"
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="")
    parser.add_argument("--token", default="")
    parser.add_argument("--rates", default="2,4,8,16,32", help="requests/s per step")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=16, help="texts per request")
    parser.add_argument("--soak", type=int, default=0, help="instead of load: this many adapter load/unload cycles")
    parser.add_argument("--metrics-url", default="", help="the target's /metrics (for --soak with --target)")
    parser.add_argument("--scenario", choices=("sweep", "overload", "fairness", "both"), default="sweep")
    parser.add_argument("--phase-seconds", type=float, default=20.0, help="length of each scenario phase")
    parser.add_argument("--knee-clients", type=int, default=4, help="closed-loop heavy clients that define the knee")
    parser.add_argument("--heavy-batch", type=int, default=128, help="texts per heavy-tenant request")
    parser.add_argument("--light-batch", type=int, default=8, help="texts per light-tenant request")
    parser.add_argument("--light-token", default="", help="the second tenant's token (for the scenarios with --target)")
    args = parser.parse_args()
    source = REPO / "examples" / "data" / "sms_spam" / "test.jsonl"
    lines = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    texts = lines[: args.batch]
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        target, token, metrics_url = args.target, args.token, args.metrics_url
        light_token = args.light_token
        if not target:
            flags = SWEEP_FLAGS if args.scenario == "sweep" else ()
            proc, target, token, metrics_url = start_server(Path(tmp), flags)
            if args.scenario != "sweep":
                token, light_token = HEAVY_TOKEN, LIGHT_TOKEN
        try:
            if args.soak:
                soak(target, token, metrics_url, args.soak)
                return
            if args.scenario != "sweep":
                heavy_texts = lines[: args.heavy_batch]
                light_texts = lines[-args.light_batch :]
                seconds = args.phase_seconds
                peak, rate = knee(target, token, heavy_texts, args.knee_clients, seconds)
                if args.scenario in ("overload", "both"):
                    overload_scenario(target, token, heavy_texts, peak, rate, seconds)
                if args.scenario in ("fairness", "both"):
                    fairness_scenario(target, token, light_token, heavy_texts, light_texts, peak, rate, seconds)
                return
            print(f"{'req/s':>6} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8}  status codes")
            for rate in (float(r) for r in args.rates.split(",")):
                r = asyncio.run(step(target, token, rate, args.seconds, texts))
                print(f"{r['rate']:6.0f} {r['texts_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}  {r['codes']}")
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
