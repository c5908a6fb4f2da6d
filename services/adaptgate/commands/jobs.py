"""`adaptgate jobs …`, with a progress bar that follows WatchJob's events."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from adaptgate.client import Client
from adaptgate.v1 import finetune_pb2


def state_name(state: int) -> str:
    return finetune_pb2.JobState.Name(state)


def watch(client: Client, job_id: str) -> finetune_pb2.JobEvent | None:
    """Follow a job to its terminal state; returns the last event."""
    last = None
    with tqdm(total=100, desc=job_id, unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}") as bar:
        for event in client.watch_job(job_id):
            bar.update(max(0.0, event.progress * 100 - bar.n))
            postfix = state_name(event.state)
            if event.kind == "eval":
                postfix += f" acc={event.metrics.accuracy:.4f} f1={event.metrics.macro_f1:.4f}"
            if event.eta_seconds > 0:
                postfix += f" eta={event.eta_seconds:.0f}s"
            bar.set_postfix_str(postfix)
            if event.kind in ("state", "log") and event.message:
                bar.write(f"[{state_name(event.state)}] {event.message}")
            last = event
    return last


def print_job(job: finetune_pb2.Job) -> None:
    print(
        f"{job.id}  {state_name(job.state):9} {job.method:5} {job.adapter_name:20} "
        f"progress={job.progress:.0%} acc={job.metrics.accuracy:.4f} {job.adapter or job.error}"
    )


def run_jobs_command(client: Client, args: argparse.Namespace) -> None:
    if args.action == "submit":
        if not args.dataset or not args.adapter_name:
            sys.exit("jobs submit needs --dataset and --adapter-name")
        job = client.submit_job(args.dataset, args.adapter_name, args.method, args.alias)
        print_job(job)
        if args.watch:
            watch(client, job.id)
            print_job(client.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=client.metadata))
        return
    if args.action == "list":
        for job in client.finetune.ListJobs(finetune_pb2.ListJobsRequest(), metadata=client.metadata).jobs:
            print_job(job)
        return
    if not args.job_id:
        sys.exit(f"jobs {args.action} needs a job id")
    ref = finetune_pb2.JobRef(id=args.job_id)
    if args.action == "watch":
        watch(client, args.job_id)
        ref_job = client.finetune.GetJob(ref, metadata=client.metadata)
    elif args.action == "cancel":
        ref_job = client.finetune.CancelJob(ref, metadata=client.metadata)
    else:
        ref_job = client.finetune.GetJob(ref, metadata=client.metadata)
    print_job(ref_job)
