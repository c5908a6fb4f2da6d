"""A real multi-node Ray cluster on this machine: a LoRA job outlives the node it trains on.

The cluster is started with the `ray` CLI, as an operator would: a head with no CPUs (so no job
runs there) and worker nodes with one CPU each and the custom resource `adaptgate-training`, every
node with its own temp dir (its own session, sockets, object store, logs). A real gateway joins it
with ADAPTGATE_STORAGE_URI naming a directory outside every node's temp dir, and
ADAPTGATE_TRAINING_RESOURCES pinning jobs to the `adaptgate-training` workers.

The job starts on node A (the only node then); node B joins while it trains. Once a checkpoint is
in shared storage and training has moved past it, every process of node A (raylet and its object
store, agents, the training worker) is SIGKILLed. Ray retries the task on B, which continues from
the checkpoint A wrote; the job succeeds with the accuracy of an uninterrupted run of the same job,
and the test prints what the kill cost in wall time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from adaptgate.client import Client
from adaptgate.v1 import finetune_pb2
from tests.integration.conftest import running_gateway
from tests.integration.test_training_loop import upload_bytes, watch
from tests.integration.test_training_lora import submit
from tests.unit.training.conftest import separable_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = Path(sys.executable).with_name("ray")
RESOURCE = "adaptgate-training"
STARTED = "Ray runtime started."
NODE_START_S = 180  # a node that is not up by then on a loaded 2-core machine fails the test
WORKER = re.compile(r"running on Ray worker pid (\d+)")
EVAL_STEP = re.compile(r"^step (\d+)/(\d+): validation")
PROGRESS_STEP = re.compile(r"^step (\d+)/(\d+) \(epoch")
RESUMED = re.compile(r"resumed from the checkpoint at step (\d+)/(\d+)")
JOB = {  # 480 steps of the tiny BERT (about 8 s of one core), a checkpoint every 60 steps
    "method": "lora", "max_steps": 480, "epochs": 100, "batch_size": 16, "max_tokens": 32, "learning_rate": 0.01,
    "seed": 7, "validation_fraction": 0.25,
}
TERMINAL = {finetune_pb2.SUCCEEDED, finetune_pb2.FAILED, finetune_pb2.CANCELLED}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    """One `ray start --block` process: every process of the node descends from it."""

    name: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"ray node {self.name} exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
        return STARTED in self.log.read_text()

    def wait_up(self) -> None:
        deadline = time.monotonic() + NODE_START_S
        while not self.up():
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray node {self.name} not up after {NODE_START_S} s: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)  # polling the node's log, with a deadline
        assert any(self.temp_dir.glob("session_*")), f"node {self.name} keeps its session in its own temp dir"

    def pids(self) -> set[int]:
        try:
            root = psutil.Process(self.process.pid)
            return {root.pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self) -> None:
        """SIGKILL every process of the node at once, as a machine dying would: stopped first, so none
        forks a new one (or is re-parented away from the tree) between listing and killing."""
        procs = _tree(self.process.pid)
        for proc in procs:
            _quietly(proc.suspend)
        procs = _tree(self.process.pid) | procs
        for proc in procs:
            _quietly(proc.kill)
        psutil.wait_procs(list(procs), timeout=30)
        self.process.wait(timeout=30)


def _tree(pid: int) -> set[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _quietly(action: Any) -> None:
    try:
        action()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


@dataclass
class Cluster:
    base: Path
    port: int
    env: dict[str, str]
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> Node:
        temp_dir = self.base / name
        temp_dir.mkdir()
        log = self.base / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(RAY), "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        node = self.nodes[name] = Node(name, temp_dir, log, process)
        return node

    def start_worker(self, name: str) -> Node:
        return self.start(
            name, f"--address={self.address}", "--num-cpus=1", f"--resources={json.dumps({RESOURCE: 1})}",
            "--object-store-memory=100000000",
        )


@contextmanager
def ray_cluster() -> Iterator[Cluster]:
    """A head only; worker nodes join with `start_worker`. Teardown kills this cluster's processes and
    no others (never `ray stop`, which would stop every Ray of this user, other tests' included)."""
    base = Path(tempfile.mkdtemp(prefix="agray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = Cluster(base, free_port(), env)
    try:
        cluster.start(
            "head", "--head", f"--port={cluster.port}", "--num-cpus=0", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}", "--object-store-memory=100000000",
        ).wait_up()
        yield cluster
    finally:
        for node in reversed(list(cluster.nodes.values())):
            node.kill()
        for proc in psutil.process_iter(["cmdline"]):  # anything that escaped its tree still names our temp dir
            if str(base) in " ".join(proc.info["cmdline"] or []):
                _quietly(proc.kill)
        shutil.rmtree(base, ignore_errors=True)


def dataset_rows() -> bytes:
    """Two classes, every 9th label flipped: accuracy below 100%, so a resume that went wrong would show."""
    rows = separable_rows(80)
    for index in range(0, len(rows), 9):
        rows[index]["label"] = "money" if rows[index]["label"] == "animal" else "animal"
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@dataclass
class Run:
    events: list[finetune_pb2.JobEvent]
    seconds: float  # SubmitJob to SUCCEEDED
    start_up: float  # SubmitJob to the first attempt's model loaded (a fresh worker imports torch; a reused one does not)
    accuracy: float


def finish(client: Client, job_id: str, began: float, events: list[finetune_pb2.JobEvent]) -> Run:
    """`began`: time.time() at SubmitJob (event times are the gateway's time.time(), on this machine)."""
    assert events and events[-1].state == finetune_pb2.SUCCEEDED, [e.message for e in events[-5:]]
    seconds = time.time() - began
    loaded = next(e.time for e in events if e.message.startswith("loaded base model"))
    done = client.finetune.GetJob(finetune_pb2.JobRef(id=job_id), metadata=client.metadata)
    return Run(events, seconds, loaded - began, done.metrics.accuracy)


def test_a_lora_job_continues_on_another_node_when_its_node_dies(tiny_bert_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # every node and the gateway reach it; no node's temp dir holds it
    with ray_cluster() as cluster:
        node_a = cluster.start_worker("a")
        env = {"ADAPTGATE_STORAGE_URI": f"file://{shared}", "ADAPTGATE_TRAINING_RESOURCES": json.dumps({RESOURCE: 1}),
               "RAY_AUTH_MODE": cluster.env["RAY_AUTH_MODE"], "RAY_AUTH_TOKEN": cluster.env["RAY_AUTH_TOKEN"]}
        # --ray-address, not ADAPTGATE_RAY_ADDRESS: the harness sets RAY_ADDRESS="", which settings read first
        with _environment(env), running_gateway(
            tmp_path / "gateway", "--base-model", str(tiny_bert_dir), "--ray-address", cluster.address
        ) as gateway:
            node_a.wait_up()
            acme = Client(gateway.target, "acme-token")
            dataset = upload_bytes(acme, "noisy", "jsonl", dataset_rows())
            interrupted, kill = run_and_kill_node(acme, dataset.id, cluster, shared)
            straight = run(acme, dataset.id, "straight")  # the same job, same seed, on the same cluster (now node B)
    report_time_lost(interrupted, straight, kill)
    assert abs(interrupted.accuracy - straight.accuracy) <= 0.005, (interrupted.accuracy, straight.accuracy)
    assert 0.5 < straight.accuracy < 1.0  # trained, and the flipped labels keep it off 100%


@dataclass
class Kill:
    at: float  # time.time() of the kill
    step: int  # the last step A reported
    checkpoint: int  # the last checkpoint A wrote
    second_node_up: bool


def run_and_kill_node(client: Client, dataset_id: str, cluster: Cluster, shared: Path) -> tuple[Run, Kill]:
    node_a = cluster.nodes["a"]
    began = time.time()
    job = submit(client, dataset_id=dataset_id, adapter_name="survivor", **JOB)
    state = shared / "checkpoints" / job.id / "state.safetensors"
    events: list[finetune_pb2.JobEvent] = []
    pids: list[int] = []
    checkpoint = 0
    kill: Kill | None = None
    for event in watch(client, job.id):
        events.append(event)
        if found := WORKER.search(event.message):
            pids.append(int(found[1]))
            node = node_a if len(pids) == 1 else cluster.nodes["b"]
            assert pids[-1] in node.pids(), f"attempt {len(pids)} runs outside node {node.name}"
            if len(pids) == 1:
                cluster.start_worker("b")  # joins while the job trains on A: the only place left once A dies
        elif kill is None and (found := EVAL_STEP.match(event.message)):
            assert state.exists(), "a checkpoint is written before its evaluation is reported"
            checkpoint = int(found[1])
        elif kill is None and checkpoint and (found := PROGRESS_STEP.match(event.message)):
            second_node_up = cluster.nodes["b"].up()
            if second_node_up or checkpoint >= JOB["max_steps"] // 2:  # B is up (else its start counts as lost), or half-way
                node_a.kill()
                kill = Kill(time.time(), int(found[1]), checkpoint, second_node_up)
    result = finish(client, job.id, began, events)
    assert kill is not None, "the job finished before node A was killed"
    assert len(pids) == 2 and pids[0] != pids[1] and not node_a.pids()
    messages = [e.message for e in events]
    retry = next(m for m in messages if WORKER.search(m) and str(pids[1]) in m)
    assert "an earlier attempt stopped, continuing from its checkpoint" in retry
    resumed = [int(found[1]) for m in messages if (found := RESUMED.search(m))]
    # At least the checkpoint seen; a later one when A got further than its events had told before it died.
    assert resumed and kill.checkpoint <= resumed[0] < JOB["max_steps"], (resumed, kill)
    return result, kill


def run(client: Client, dataset_id: str, name: str) -> Run:
    began = time.time()
    job = submit(client, dataset_id=dataset_id, adapter_name=name, **JOB)
    events = list(watch(client, job.id))
    assert not any(RESUMED.search(e.message) for e in events)
    return finish(client, job.id, began, events)


def report_time_lost(interrupted: Run, straight: Run, kill: Kill) -> None:
    """What the kill cost: the interrupted job's wall time minus the uninterrupted one's, and where it went."""
    retry = next(e for e in interrupted.events if e.time > kill.at and WORKER.search(e.message))
    resumed = next(e for e in interrupted.events if RESUMED.search(e.message))
    lost = interrupted.seconds - straight.seconds
    same_start = lost - (interrupted.start_up - straight.start_up)
    print(
        f"\nnode kill: interrupted job {interrupted.seconds:.1f} s, uninterrupted {straight.seconds:.1f} s: time lost {lost:.1f} s, "
        f"{same_start:.1f} s without the first attempt's slower start-up ({interrupted.start_up:.1f} s on a fresh worker "
        f"vs {straight.start_up:.1f} s); kill at step {kill.step}, last checkpoint {kill.checkpoint}, node B up: "
        f"{kill.second_node_up}; kill -> retry started on B {retry.time - kill.at:.1f} s -> resumed "
        f"{resumed.time - kill.at:.1f} s; accuracy {interrupted.accuracy:.4f} vs {straight.accuracy:.4f}"
    )


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set for the gateway process, which inherits this one's environment; restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
