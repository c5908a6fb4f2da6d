"""`make bench`: embedding throughput, adaptgate over gRPC (separate client process) vs sentence-transformers.

Same texts, same dtype (bf16 where the CPU has AMX/avx512_bf16). Prints texts/s, p50/p99 latency per
32-text request at a fixed client concurrency, and the ratio. Not a test: numbers for the notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def load_texts(n: int) -> list[str]:
    source = SHARED / "sst2" / "train.jsonl"
    if not source.exists():
        source = REPO / "examples" / "data" / "sms_spam" / "train.jsonl"
    lines = source.read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def bench_sentence_transformers(texts: list[str], batch: int) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    from adaptgate.engine.device import cpu_has_fast_bf16
    from adaptgate.engine.model import packaged_model_dir

    model = SentenceTransformer(str(packaged_model_dir()), device="cpu")
    if cpu_has_fast_bf16():
        model = model.to(torch.bfloat16)
    model.encode(texts[:64], batch_size=batch)
    started = time.perf_counter()
    model.encode(texts, batch_size=batch, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - started)


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"bench": {"tenant": "bench"}}}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--data-dir", str(data_dir), "--tokens-file", str(tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            return proc, f"127.0.0.1:{match[1]}"
    raise RuntimeError("server did not start")


def bench_gateway(target: str, texts: list[str], batch: int, concurrency: int) -> tuple[float, float, float]:
    from adaptgate.client import Client

    client = Client(target, "bench")
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    client.embed_array(chunks[0], truncate=True)
    latencies: list[float] = []

    def one(chunk: list[str]) -> None:
        started = time.perf_counter()
        client.embed_array(chunk, truncate=True)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, chunks))
    elapsed = time.perf_counter() - started
    return len(texts) / elapsed, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    texts = load_texts(args.texts)
    st = bench_sentence_transformers(texts, args.batch)
    print(f"sentence-transformers in-process: {st:8.1f} texts/s")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc, target = start_server(Path(tmp))
        print(f"gateway cold start: {time.perf_counter() - started:.1f}s")
        try:
            rate, p50, p99 = bench_gateway(target, texts, args.batch, args.concurrency)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"adaptgate gRPC end to end:        {rate:8.1f} texts/s  p50 {p50 * 1000:.0f} ms  p99 {p99 * 1000:.0f} ms "
          f"({args.concurrency} clients x {args.batch} texts)")
    print(f"ratio adaptgate / sentence-transformers: {rate / st:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
