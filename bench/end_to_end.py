"""Many tenants end to end: base Embed vs Classify with one adapter vs Classify over 64 distinct adapters, over gRPC.

    .venv/bin/python bench/end_to_end.py                      # single-text requests, 64 in flight
    .venv/bin/python bench/end_to_end.py --texts-per-request 8
    .venv/bin/python bench/end_to_end.py --mixed              # half the requests Embed, half Classify
    .venv/bin/python bench/end_to_end.py --profile /tmp/gateway.txt   # and py-spy the gateway meanwhile
    .venv/bin/python bench/end_to_end.py --tree before=/tmp/old-checkout --tree after=.   # A/B two source trees

Starts a loopback gateway (packaged all-MiniLM-L6-v2), uploads `--adapters` PEFT LoRA adapters with a
2-label head each (made as bench/multi_adapter.py makes them), loads them all, then drives three
workloads over the same texts: `base` (Embed, no adapter), `one` (Classify, one adapter for every
request) and `many` (Classify, the adapters in turn). Each pass sends `--requests` requests with
`--in-flight` of them outstanding at once; the workloads take turns within each round (a shared VM's
noise hits all alike; each round starts one workload later than the last, so none always runs first) and
the medians of `--rounds` rounds are printed, with each one's ratio to base and the median and range of
its ratios round by round.
With `--mixed`, `one` and `many` alternate Embed and Classify requests (the ratio is still to all-Embed).
With several `--tree`s, a gateway runs from each tree (its `services/` first on PYTHONPATH) and every
workload of every tree takes its turn in each round: a before/after comparison in one run.

With `--profile FILE`, py-spy (`pip install -e ".[bench]"`) samples the last tree's gateway through
the timed rounds; FILE gets its collapsed stacks and the top functions of its event loop and engine
thread are printed.

The gateway's per-stage CPU time (adaptgate_request_stage_seconds, read from its /metrics around each
pass) is printed as microseconds per request and stage, per workload. Not a test: it prints figures (docs/performance.md keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np

from adaptgate.v1 import classifier_pb2, classifier_pb2_grpc, embeddings_pb2, embeddings_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TOKEN, TENANT = "bench-token", "bench"
WORKLOADS = ("base", "one", "many")
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(gRPC\) and :(\d+)/metrics")
# One tenant sends every request: its in-flight and distinct-adapter budgets are lifted so that the
# bench measures per-request cost, not admission refusals.
SERVER_FLAGS = ("--max-inflight-per-tenant", "0", "--max-leased-adapters-per-tenant", "0")
# Stages that wait (a worker thread, a load, the queue, the engine): left out of the `on loop` column.
AWAITING_STAGES = ("tokenize", "lease", "queue_wait", "forward")
CPU_SERIES = re.compile(r"^process_cpu_seconds_total (\S+)$", re.M)
STAGE_SERIES = re.compile(r'^adaptgate_request_stage_seconds_(sum|count)\{method="(\w+)",stage="(\w+)"\} (\S+)$', re.M)
BATCH_SERIES = re.compile(r"^adaptgate_batch_(size|duration_seconds)_(sum|count) (\S+)$", re.M)


@dataclass
class Gateway:
    label: str
    proc: subprocess.Popen[str]
    target: str
    metrics_url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_gateway(label: str, tree: Path, data_dir: Path, extra: list[str]) -> Gateway:
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {TOKEN: {"tenant": TENANT}}}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
           "--http-port", "-1", "--data-dir", str(data_dir), "--tokens-file", str(tokens), *SERVER_FLAGS, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree / "services")}
    # Its log goes to a file: through a pipe, the server's access lines would wait on this process's reads.
    log = data_dir / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=tree, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if match := READY.search(log.read_text()):
            return Gateway(label, proc, f"127.0.0.1:{match[1]}", f"http://127.0.0.1:{match[2]}/metrics")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"gateway {label} did not start:\n{log.read_text()[-3000:]}")


def make_adapters(multi: ModuleType, out: Path, n: int, rank: int) -> list[Path]:
    """n LoRA adapters (query/key/value/dense) with a 2-label head each, saved by PEFT."""
    import torch

    from adaptgate.engine.model import packaged_model_dir

    multi.make_peft_model(packaged_model_dir(), n, rank, out, torch.float32, torch.device("cpu"))
    dirs = multi.adapter_dirs(out, n)
    for d in dirs:
        (d / "labels.json").write_text(json.dumps(["negative", "positive"]))
    return dirs


def publish(gateway: Gateway, dirs: list[Path]) -> list[str]:
    """Upload and load every adapter (so no pass pays a cache miss); their references, in order."""
    from adaptgate.client import Client
    from adaptgate.v1 import adapters_pb2

    client = Client(gateway.target, TOKEN)
    try:
        refs = [client.upload_adapter(d, f"a{i}").ref for i, d in enumerate(dirs)]
        for ref in refs:
            client.adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(ref=ref), metadata=client.metadata)
    finally:
        client.close()
    return refs


@dataclass
class Workload:
    """One tree's gateway under one workload: the request for each index, and what its passes measured."""

    gateway: Gateway
    name: str
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the gateway process's CPU time per request, each pass
    codes: Counter = field(default_factory=Counter)
    stage_sum: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    stage_count: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    batches: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # adaptgate_batch_* deltas

    def batch_line(self) -> str:
        """Rows per forward pass and engine ms per row, over the timed passes."""
        passes = self.batches[("batch_size", "count")] or 1
        rows = self.batches[("batch_size", "sum")] or 1
        return f"{rows / passes:9.1f} {self.batches[('batch_duration_seconds', 'sum')] / rows * 1000:9.3f}"

    @property
    def label(self) -> str:
        return f"{self.gateway.label}:{self.name}" if self.gateway.label else self.name


def requests_of(name: str, texts: list[str], per_request: int, refs: list[str], count: int, mixed: bool) -> list[tuple[str, object]]:
    """(method, request) for each index: request k carries texts k*per_request.. (the same for every workload)."""
    out: list[tuple[str, object]] = []
    for k in range(count):
        chunk = [texts[(k * per_request + j) % len(texts)] for j in range(per_request)]
        if name == "base" or (mixed and k % 2 == 0):
            out.append(("Embed", embeddings_pb2.EmbedRequest(texts=chunk, truncate=True, encoding=embeddings_pb2.ENCODING_BYTES_F32)))
        else:
            adapter = refs[0] if name == "one" else refs[k % len(refs)]
            out.append(("Classify", classifier_pb2.ClassifyRequest(texts=chunk, adapter=adapter, truncate=True)))
    return out


async def drive(target: str, calls: list[tuple[str, object]], in_flight: int) -> tuple[float, Counter]:
    """Requests/s with `in_flight` callers, each taking the next request as soon as its last is answered."""
    codes: Counter = Counter()
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stubs = {"Embed": embeddings_pb2_grpc.EmbeddingsStub(channel).Embed,
                 "Classify": classifier_pb2_grpc.ClassifierStub(channel).Classify}
        cursor = iter(calls)

        async def caller() -> None:
            for method, request in cursor:
                try:
                    await stubs[method](request, metadata=metadata, timeout=60)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return len(calls) / (time.perf_counter() - started), codes


def stage_totals(metrics_url: str) -> dict[tuple[str, str, str], float]:
    """(method, stage, sum|count) -> value, and ("", "", "cpu") -> the process's CPU seconds, from /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    totals = {(m, s, kind): float(v) for kind, m, s, v in STAGE_SERIES.findall(text)}
    totals[("", "", "cpu")] = float(CPU_SERIES.search(text)[1])
    totals.update({("", f"batch_{series}", kind): float(v) for series, kind, v in BATCH_SERIES.findall(text)})
    return totals


def run_pass(workload: Workload, calls: list[tuple[str, object]], in_flight: int, timed: bool) -> None:
    before = stage_totals(workload.gateway.metrics_url)
    rate, codes = asyncio.run(drive(workload.gateway.target, calls, in_flight))
    if not timed:
        return
    after = stage_totals(workload.gateway.metrics_url)
    workload.rates.append(rate)
    workload.codes.update(codes)
    workload.cpu_ms.append((after.pop(("", "", "cpu")) - before[("", "", "cpu")]) / len(calls) * 1000)
    for series in ("batch_size", "batch_duration_seconds"):
        for kind in ("sum", "count"):
            key = ("", series, kind)
            workload.batches[(series, kind)] += after.pop(key, 0.0) - before.get(key, 0.0)
    for (method, stage, kind), value in after.items():
        delta = value - before.get((method, stage, kind), 0.0)
        if delta > 0:
            (workload.stage_sum if kind == "sum" else workload.stage_count)[(method, stage)] += delta


def round_ratios(workload: Workload, base: Workload) -> str:
    """The median and range of the workload's rate over base's, round by round: passes of one round ran
    minutes apart at most, so a VM's slow spell weighs on both sides of each ratio."""
    ratios = [rate / base_rate for rate, base_rate in zip(workload.rates, base.rates)]
    return f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def print_rates(workloads: list[Workload]) -> None:
    bases = {w.gateway.label: w for w in workloads if w.name == "base"}
    print(f"{'workload':<24} {'req/s (median)':>14} {'passes':>24} {'vs base':>8} {'by round (range)':>19} "
          f"{'CPU ms/req':>11} {'vs base':>8} {'rows/pass':>9} {'ms/row':>9}  codes")
    for w in workloads:
        base = bases[w.gateway.label]
        median, cpu = float(np.median(w.rates)), float(np.median(w.cpu_ms))
        passes = " ".join(f"{r:.0f}" for r in w.rates)
        print(f"{w.label:<24} {median:14.1f} {passes:>24} {median / float(np.median(base.rates)):7.2f}x "
              f"{round_ratios(w, base):>19} {cpu:11.3f} {float(np.median(base.cpu_ms)) / cpu:7.2f}x {w.batch_line()}  "
              f"{dict(w.codes)}")
    print("(by round: the median of each round's ratio to that round's base pass, and their range; CPU ms/req: the "
          "gateway process's CPU time per request, all threads; its 'vs base' is base's over this one's, so both ratios "
          "read as speed; rows/pass and ms/row: the engine's forward passes, wall time)")


def print_stages(workloads: list[Workload]) -> None:
    """Microseconds per request of each stage (CPU time, but wall time for queue waits: see metrics.py)."""
    stages = sorted({s for w in workloads for (_, s) in w.stage_sum}, key=_stage_order)
    if not stages:
        print("(the gateway exports no adaptgate_request_stage_seconds: an older tree)")
        return
    print("gateway time per request by stage, microseconds (adaptgate_request_stage_seconds; forward: the request's "
          "share of the passes)")
    print(f"{'workload':<24} {'method':<9} " + " ".join(f"{s:>10}" for s in stages) + f" {'on loop':>10}")
    for w in workloads:
        for method in sorted({m for (m, _) in w.stage_count}):
            requests = max(n for (m, _), n in w.stage_count.items() if m == method)  # every request has `observe`
            per = {s: w.stage_sum.get((method, s), 0.0) / requests * 1e6 for s in stages}
            loop = sum(v for s, v in per.items() if s not in AWAITING_STAGES)
            cells = " ".join(f"{per[s]:10.1f}" for s in stages)
            print(f"{w.label:<24} {method:<9} {cells} {loop:10.1f}")


def _stage_order(stage: str) -> int:
    from_metrics = ("decode", "auth", "resolve", "admission", "tokenize", "lease", "queue_wait", "forward", "head",
                    "answer", "encode")
    return from_metrics.index(stage) if stage in from_metrics else len(from_metrics)


def start_profile(gateway: Gateway, out: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "--pid", str(gateway.proc.pid), "--rate", "200", "--format", "raw", "--output", str(out),
           "--nonblocking", "--threads", "--duration", "3600"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_profile(spy: subprocess.Popen[bytes], out: Path, top: int = 15) -> None:
    """Stop py-spy (it writes its file on SIGINT), then each thread's functions by own samples."""
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=120)
    by_thread: dict[str, Counter] = defaultdict(Counter)
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].rsplit(": ", 1)[-1].rstrip(")")
        by_thread["engine" if thread.startswith("engine") else thread][frames[-1]] += int(n)
    for thread in ("MainThread", "engine"):
        samples = by_thread.get(thread, Counter())
        total = sum(samples.values()) or 1
        print(f"py-spy, {thread} ({total} samples), own time:")
        for frame, n in samples.most_common(top):
            print(f"  {n / total:6.1%}  {frame}")


def parse_trees(values: list[str]) -> list[tuple[str, Path]]:
    if not values:
        return [("", REPO)]
    trees = []
    for value in values:
        label, _, path = value.rpartition("=")
        trees.append((label or Path(path).name, Path(path).resolve()))
    return trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2048, help="requests per pass")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--mixed", action="store_true", help="one and many alternate Embed and Classify requests")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="run a gateway from this source tree (repeat for an A/B); default: this checkout")
    parser.add_argument("--server-flag", action="append", default=[], help="an extra flag for `adaptgate serve`")
    parser.add_argument("--profile", type=Path, help="py-spy the last tree's gateway through the timed rounds into this file")
    args = parser.parse_args()
    import multi_adapter as multi  # its texts and adapters: both benches serve the same ones (bench/ is on sys.path)
    texts = multi.load_texts(max(args.requests * args.texts_per_request, 256))
    gateways: list[Gateway] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dirs = make_adapters(multi, Path(tmp) / "adapters", args.adapters, args.rank)
            workloads = []
            for i, (label, tree) in enumerate(parse_trees(args.tree)):
                gateway = start_gateway(label, tree, Path(tmp) / f"data{i}", args.server_flag)
                gateways.append(gateway)
                refs = publish(gateway, dirs)
                for name in WORKLOADS:
                    calls = requests_of(name, texts, args.texts_per_request, refs, args.requests, args.mixed)
                    workloads.append((Workload(gateway, name), calls))
            for w, calls in workloads:  # warm-up: one untimed pass each (oneDNN kernels, caches)
                run_pass(w, calls, args.in_flight, timed=False)
            spy = start_profile(gateways[-1], args.profile) if args.profile else None
            for k in range(args.rounds):
                for w, calls in workloads[k % len(workloads):] + workloads[: k % len(workloads)]:
                    run_pass(w, calls, args.in_flight, timed=True)
            if spy is not None:
                print_profile(spy, args.profile)
        finally:
            for gateway in gateways:
                gateway.stop()
    ws = [w for w, _ in workloads]
    mode = "mixed Embed/Classify" if args.mixed else "Classify"
    print(f"{args.requests} requests x {args.texts_per_request} text(s), {args.in_flight} in flight, {args.rounds} interleaved "
          f"rounds; one/many: {mode} with 1 / {args.adapters} LoRA r={args.rank} adapters (2-label heads)")
    print_rates(ws)
    print_stages(ws)


if __name__ == "__main__":
    main()
