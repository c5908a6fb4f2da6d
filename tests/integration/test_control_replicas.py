"""Two control replicas share one real PostgreSQL, one adapter store and one storage directory.

SIGKILL the replica that runs a LoRA job (the gateway and its local Ray, as when a pod dies): the
other replica takes the job over once the lease has expired, resumes it from the checkpoint on
shared storage, finishes it, and exactly one version is published; both replicas list the same jobs.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from adaptgate.client import Client
from adaptgate.v1 import adapters_pb2, finetune_pb2
from tests.integration.conftest import Gateway, running_gateway
from tests.integration.test_training_lora import submit, upload_slice
from tests.integration.test_training_loop import watch

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LEASE_S = 4.0


def replica(stack: ExitStack, root: Path, name: str, database_url: str) -> Gateway:
    """A control replica with its own data dir; the adapter store and storage are the shared ones."""
    data_dir = root / name
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "adapters").exists():
        (data_dir / "adapters").symlink_to(root / "shared" / "adapters", target_is_directory=True)
    flags = (
        "--role", "control", "--database-url", database_url, "--storage-uri", str(root / "shared" / "storage"),
        "--job-lease-seconds", str(LEASE_S), "--replica-id", name,
    )
    return stack.enter_context(running_gateway(data_dir, *flags, log_name=f"server-{time.monotonic_ns()}.log"))


def kill_replica(gateway: Gateway) -> None:
    """SIGKILL the gateway and every process it started (its local Ray): nothing gets to clean up."""
    root = psutil.Process(gateway.process.pid)
    for process in [*root.children(recursive=True), root]:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    gateway.process.wait(timeout=30)


def jobs(client: Client) -> list[tuple[str, int, str]]:
    listed = client.finetune.ListJobs(finetune_pb2.ListJobsRequest(), metadata=client.metadata, timeout=30).jobs
    return sorted((j.id, j.state, j.adapter) for j in listed)


def test_a_killed_replica_s_job_is_taken_over_resumed_and_published_once(tmp_path: Path, pg_database_url: str) -> None:
    (tmp_path / "shared" / "adapters").mkdir(parents=True)
    with ExitStack() as stack:
        a = replica(stack, tmp_path, "replica-a", pg_database_url)
        b = replica(stack, tmp_path, "replica-b", pg_database_url)
        on_a, on_b = Client(a.target, "acme-token"), Client(b.target, "acme-token")
        dataset = upload_slice(on_a, "sms-ha", count=400)
        job = submit(on_a, dataset_id=dataset.id, adapter_name="sms-ha", method="lora", max_steps=40, max_tokens=32, seed=3)
        for event in watch(on_a, job.id):  # the first evaluation comes with a checkpoint on shared storage
            assert not event.state == finetune_pb2.FAILED, event.message
            if event.kind == "eval":
                break
        killed_at = time.time()
        kill_replica(a)

        events = list(watch(on_b, job.id, timeout=600))
        final = events[-1]
        assert final.state == finetune_pb2.SUCCEEDED, final.message
        taken = [e for e in events if "taken over by replica replica-b" in e.message]
        assert len(taken) == 1, [e.message for e in events]
        waited = taken[0].time - killed_at
        assert waited <= LEASE_S * 2 + 5, f"took over {waited:.1f} s after the kill; the lease is {LEASE_S} s"
        after = events[events.index(taken[0]):]
        assert any("continuing from its checkpoint" in e.message for e in after), [e.message for e in after]
        assert any(e.message.startswith("resumed from the checkpoint at step") for e in after), [e.message for e in after]

        listed = on_b.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=on_b.metadata).adapters
        versions = [(x.ref, x.source) for x in listed if x.name == "sms-ha"]
        assert versions == [("acme/sms-ha@v1", f"job:{job.id}")]
        a_again = replica(stack, tmp_path, "replica-a", pg_database_url)
        assert jobs(Client(a_again.target, "acme-token")) == jobs(on_b) == [(job.id, finetune_pb2.SUCCEEDED, "acme/sms-ha@v1")]
        print(f"job taken over {waited:.1f} s after its replica was killed (lease {LEASE_S:g} s)")
