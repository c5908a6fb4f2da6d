"""Bounded load against a gateway: rising request rates, then stop; throughput, p50/p99, errors by status.

    .venv/bin/python bench/load.py                       # starts its own loopback gateway
    .venv/bin/python bench/load.py --target host:50051 --token T
    .venv/bin/python bench/load.py --soak 1000          # resident memory over adapter load/unload cycles

Each step offers a fixed rate of Embed requests (open loop: requests are sent on schedule whether
or not earlier ones finished) for a few seconds; a step's results show where the knee is and that
beyond it the server answers RESOURCE_EXHAUSTED quickly instead of queueing forever.
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
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from adaptgate.v1 import adapters_pb2, adapters_pb2_grpc, embeddings_pb2, embeddings_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


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


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], str, str, str]:
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"load": {"tenant": "load"}}}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
           "--data-dir", str(data_dir), "--tokens-file", str(tokens), "--max-queue-texts", "512",
           "--max-inflight-per-tenant", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+) \(gRPC\) and :(\d+)/metrics", line):
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
    args = parser.parse_args()
    source = REPO / "examples" / "data" / "sms_spam" / "test.jsonl"
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()[: args.batch]]
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        target, token, metrics_url = args.target, args.token, args.metrics_url
        if not target:
            proc, target, token, metrics_url = start_server(Path(tmp))
        try:
            if args.soak:
                soak(target, token, metrics_url, args.soak)
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
