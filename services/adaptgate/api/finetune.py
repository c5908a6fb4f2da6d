"""adaptgate.v1.Finetune."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, server_stream, unary
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.jobs.records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.v1 import finetune_pb2 as pb
from adaptgate.v1 import finetune_pb2_grpc

STATES = {s: pb.JobState.Value(s.name) for s in JobState}
METRIC_FIELDS = tuple(pb.JobMetrics.DESCRIPTOR.fields_by_name)


def metrics_proto(metrics: dict[str, float]) -> pb.JobMetrics:
    return pb.JobMetrics(**{field: metrics.get(field, 0.0) for field in METRIC_FIELDS})


def details_proto(details: dict[str, Any]) -> pb.JobDetails:
    """The JSON-shaped details of a job or event (see training/runners/updates.py) as a JobDetails message."""
    out = pb.JobDetails()
    if confusion := details.get("confusion"):
        out.confusion.labels.extend(str(label) for label in confusion.get("labels", []))
        out.confusion.rows.extend(pb.ConfusionRow(counts=[int(c) for c in row]) for row in confusion.get("matrix", []))
    for block in details.get("blocks", []):
        out.blocks.append(pb.BlockLearningRate(
            block=int(block.get("block", 0)), alpha=float(block.get("alpha", 0.0)),
            multiplier=float(block.get("multiplier", 0.0)), learning_rate=float(block.get("learning_rate", 0.0)),
        ))
    if method := details.get("method"):
        out.method.chosen, out.method.reason = str(method.get("chosen", "")), str(method.get("reason", ""))
    return out


def job_proto(job: JobRecord) -> pb.Job:
    return pb.Job(
        id=job.id, state=STATES[job.state], adapter=job.adapter_ref or "", tenant=job.tenant,
        dataset_id=job.dataset_id, adapter_name=job.adapter_name, method=job.method, error=job.error or "",
        progress=job.progress, metrics=metrics_proto(job.metrics), created_at=job.created_at, updated_at=job.updated_at,
        details=details_proto(job.details), auto=job.auto, validation_dataset_id=job.validation_dataset_id,
        out_of_scope_label=job.out_of_scope_label,
    )


def event_proto(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=event.job_id, seq=event.seq, time=event.time, state=STATES[event.state], kind=event.kind,
        message=event.message, progress=event.progress, metrics=metrics_proto(event.metrics), eta_seconds=event.eta_seconds,
        details=details_proto(event.details),
    )


class FinetuneServicer(finetune_pb2_grpc.FinetuneServicer):
    def __init__(self, runtime: RpcRuntime, jobs: JobManager) -> None:
        self.runtime = runtime
        self.jobs = jobs

    @unary
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Job:
        spec = JobSpec(
            dataset_id=request.dataset_id, adapter_name=request.adapter_name, method=request.method,
            alias=request.alias, validation_fraction=request.validation_fraction or 0.1, epochs=request.epochs,
            learning_rate=request.learning_rate, seed=request.seed, lora_rank=request.lora_rank,
            batch_size=request.batch_size, max_tokens=request.max_tokens, max_steps=request.max_steps,
            max_seconds=request.max_seconds, validation_dataset_id=request.validation_dataset_id,
            out_of_scope_label=request.out_of_scope_label.strip(),
        )
        return job_proto(await self.jobs.submit(principal.tenant, spec))

    @unary
    async def GetJob(self, request: pb.JobRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Job:
        return job_proto(await self.jobs.get(principal.scope(), request.id))

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext, principal: Principal) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_proto(j) for j in await self.jobs.list(principal.scope())])

    @unary
    async def CancelJob(self, request: pb.JobRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Job:
        return job_proto(await self.jobs.cancel(principal.scope(), request.id))

    @server_stream
    async def WatchJob(
        self, request: pb.JobRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> AsyncIterator[pb.JobEvent]:
        async for event in self.jobs.watch(principal.scope(), request.id):
            yield event_proto(event)
