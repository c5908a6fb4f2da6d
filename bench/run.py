"""`make bench`: embedding throughput, adaptgate over gRPC (separate client process) against the peers.

(a) sentence-transformers `encode` in-process, and (b) the Infinity embedding server (HTTP, its
torch engine): what a user would otherwise run. Same texts, same model, same dtype (bf16 where the
CPU has AMX/avx512_bf16). Servers are driven by the same client: a fixed number of concurrent
clients, each sending 32-text requests. Every system makes one untimed pass over the texts first
(its "cold" rate is printed too: oneDNN compiles a kernel per new matmul shape), then `--passes`
timed passes, whose median is the figure (on a shared VM one pass can differ a lot from the next). Prints
texts/s, tokens/s, p50/p99 per request over all timed passes, and the ratios of the medians.
Infinity lives in its own venv (`make bench` builds .venv-peers); without it that row is skipped
and says so. Not a test: its figures, with the command, go to docs/performance.md.
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

from corpora import split_file

REPO = Path(__file__).resolve().parents[1]


def load_texts(n: int) -> list[str]:
    source = split_file("sst2") or split_file("sms_spam")
    assert source is not None, "examples/data/sms_spam is part of the repository"
    lines = source.read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def token_count(texts: list[str]) -> int:
    from transformers import AutoTokenizer

    from adaptgate.engine.model import packaged_model_dir

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"])


def bench_sentence_transformers(texts: list[str], batch: int, passes: int) -> tuple[float, float]:
    """(cold, median warm) texts/s of in-process `encode`."""
    import torch
    from sentence_transformers import SentenceTransformer

    from adaptgate.engine.device import cpu_has_fast_bf16
    from adaptgate.engine.model import packaged_model_dir

    model = SentenceTransformer(str(packaged_model_dir()), device="cpu")
    if cpu_has_fast_bf16():
        model = model.to(torch.bfloat16)
    rates = []
    for _ in range(1 + passes):
        started = time.perf_counter()
        model.encode(texts, batch_size=batch, normalize_embeddings=True)
        rates.append(len(texts) / (time.perf_counter() - started))
    return rates[0], float(np.median(rates[1:]))


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"bench": {"tenant": "bench"}}}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--http-port", "0", "--data-dir", str(data_dir), "--tokens-file", str(tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            return proc, f"127.0.0.1:{match[1]}"
    raise RuntimeError("server did not start")


def drive(call, texts: list[str], batch: int, concurrency: int, passes: int) -> tuple[float, float, float, float]:
    """Cold texts/s, then the median warm texts/s with p50 and p99 seconds per request over the warm
    passes: `concurrency` clients each sending `batch` texts."""
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    call(chunks[0])
    rates: list[float] = []
    latencies: list[float] = []
    for n in range(1 + passes):
        if n == 1:
            latencies = []  # the cold pass's are not counted

        def one(chunk: list[str]) -> None:
            started = time.perf_counter()
            call(chunk)
            latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, chunks))
        rates.append(len(texts) / (time.perf_counter() - started))
    warm = float(np.median(rates[1:]))
    return rates[0], warm, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def bench_gateway(target: str, texts: list[str], batch: int, concurrency: int, passes: int) -> tuple[float, float, float, float]:
    from adaptgate.client import Client

    client = Client(target, "bench")
    return drive(lambda chunk: client.embed_array(chunk, truncate=True), texts, batch, concurrency, passes)


def start_infinity(binary: Path, port: int = 7997) -> subprocess.Popen[str]:
    from adaptgate.engine.device import cpu_has_fast_bf16
    from adaptgate.engine.model import packaged_model_dir

    dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    cmd = [str(binary), "v2", "--model-id", str(packaged_model_dir()), "--engine", "torch", "--device", "cpu",
           "--dtype", dtype, "--batch-size", "32", "--port", str(port), "--no-model-warmup"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Uvicorn running" in line:
            return proc
    raise RuntimeError("infinity did not start")


def bench_infinity(port: int, texts: list[str], batch: int, concurrency: int, passes: int) -> tuple[float, float, float, float]:
    import urllib.request

    from adaptgate.engine.model import packaged_model_dir

    url, model = f"http://127.0.0.1:{port}/embeddings", str(packaged_model_dir())

    def call(chunk: list[str]) -> None:
        body = json.dumps({"model": model, "input": chunk}).encode()
        request = urllib.request.Request(url, body, {"content-type": "application/json"})
        vectors = json.loads(urllib.request.urlopen(request, timeout=60).read())["data"]
        np.asarray([v["embedding"] for v in vectors], dtype=np.float32)

    return drive(call, texts, batch, concurrency, passes)


def report(name: str, cold: float, rate: float, p50: float, p99: float, tokens_per_text: float, args: argparse.Namespace) -> None:
    print(f"{name:34s} {rate:8.1f} texts/s  {rate * tokens_per_text:8.0f} tokens/s  p50 {p50 * 1000:4.0f} ms  "
          f"p99 {p99 * 1000:4.0f} ms ({args.concurrency} clients x {args.batch} texts; median of {args.passes}; cold pass {cold:.1f} texts/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5, help="timed passes per system (the median is reported)")
    parser.add_argument("--infinity", type=Path, default=REPO / ".venv-peers" / "bin" / "infinity_emb")
    args = parser.parse_args()
    texts = load_texts(args.texts)
    tokens_per_text = token_count(texts) / len(texts)
    print(f"{len(texts)} texts, {tokens_per_text:.1f} tokens each on average")
    st_cold, st = bench_sentence_transformers(texts, args.batch, args.passes)
    print(f"{'sentence-transformers in-process':34s} {st:8.1f} texts/s  {st * tokens_per_text:8.0f} tokens/s  "
          f"(median of {args.passes}; cold pass {st_cold:.1f} texts/s)")
    infinity = None
    if args.infinity.exists():
        proc = start_infinity(args.infinity)
        try:
            infinity = bench_infinity(7997, texts, args.batch, args.concurrency, args.passes)
            report("Infinity (HTTP, torch engine)", *infinity, tokens_per_text, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    else:
        print(f"Infinity: skipped, {args.infinity} is missing (make bench installs it into .venv-peers)")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc, target = start_server(Path(tmp))
        print(f"gateway cold start: {time.perf_counter() - started:.1f}s")
        try:
            cold, rate, p50, p99 = bench_gateway(target, texts, args.batch, args.concurrency, args.passes)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report("adaptgate gRPC end to end", cold, rate, p50, p99, tokens_per_text, args)
    print(f"ratio adaptgate / sentence-transformers: {rate / st:.2f}x (cold passes: {cold / st_cold:.2f}x)")
    if infinity is not None:
        print(f"ratio adaptgate / Infinity: {rate / infinity[1]:.2f}x (cold passes: {cold / infinity[0]:.2f}x)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
