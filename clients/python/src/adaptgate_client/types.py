"""Typed results: plain dataclasses built from the protobuf responses, embeddings as numpy float32 arrays.

Each class names the message it mirrors (`PROTO`) and carries every one of its fields under the same name
(tests/unit/test_client_results.py holds them to that), so a new field in a .proto cannot go missing here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from adaptgate_client.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2


class Pooling(enum.IntEnum):
    """How token states become one vector; UNSPECIFIED is the base model's own."""

    UNSPECIFIED = embeddings_pb2.POOLING_UNSPECIFIED
    MEAN = embeddings_pb2.POOLING_MEAN
    CLS = embeddings_pb2.POOLING_CLS
    LAST_TOKEN = embeddings_pb2.POOLING_LAST_TOKEN


class Encoding(enum.IntEnum):
    """How vectors travel back; BYTES_F32 spares both sides a per-float protobuf cost."""

    FLOAT = embeddings_pb2.ENCODING_FLOAT
    BYTES_F32 = embeddings_pb2.ENCODING_BYTES_F32


class JobState(enum.IntEnum):
    UNSPECIFIED = finetune_pb2.JOB_STATE_UNSPECIFIED
    QUEUED = finetune_pb2.QUEUED
    RUNNING = finetune_pb2.RUNNING
    SUCCEEDED = finetune_pb2.SUCCEEDED
    FAILED = finetune_pb2.FAILED
    CANCELLED = finetune_pb2.CANCELLED

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def _vector(embedding: embeddings_pb2.Embedding) -> np.ndarray:
    if embedding.packed:
        return np.frombuffer(embedding.packed, dtype="<f4").astype(np.float32, copy=False)
    return np.asarray(embedding.values, dtype=np.float32)


@dataclass(frozen=True)
class Embeddings:
    """`vectors[i]` is texts[i]'s vector ([n, dim] float32, whichever encoding carried it); `tokens[i]` how
    many tokens the model saw for it; `chunk` the request chunk this answers (EmbedStream)."""

    PROTO: ClassVar[str] = "adaptgate.v1.EmbedResponse"
    vectors: np.ndarray
    tokens: list[int]
    model: str
    chunk: int = 0

    @classmethod
    def from_proto(cls, m: embeddings_pb2.EmbedResponse) -> Embeddings:
        vectors = np.stack([_vector(e) for e in m.embeddings]) if m.embeddings else np.zeros((0, 0), np.float32)
        return cls(vectors, [e.tokens for e in m.embeddings], m.model, m.chunk)


@dataclass(frozen=True)
class LabelScore:
    PROTO: ClassVar[str] = "adaptgate.v1.LabelScore"
    label: str
    score: float

    @classmethod
    def from_proto(cls, m: classifier_pb2.LabelScore) -> LabelScore:
        return cls(m.label, m.score)


@dataclass(frozen=True)
class Classification:
    PROTO: ClassVar[str] = "adaptgate.v1.Classification"
    label: str
    score: float
    scores: list[LabelScore]  # highest first
    abstained: bool = False  # the top score was under the abstain threshold: `label` is the abstain label

    @classmethod
    def from_proto(cls, m: classifier_pb2.Classification) -> Classification:
        return cls(m.label, m.score, [LabelScore.from_proto(s) for s in m.scores], m.abstained)


@dataclass(frozen=True)
class AdapterResults:
    PROTO: ClassVar[str] = "adaptgate.v1.AdapterResults"
    adapter: str
    results: list[Classification]

    @classmethod
    def from_proto(cls, m: classifier_pb2.AdapterResults) -> AdapterResults:
        return cls(m.adapter, [Classification.from_proto(r) for r in m.results])


@dataclass(frozen=True)
class Classifications:
    """With one `adapter`: `results` (one per text) and the concrete `adapter` that answered; with several
    `adapters`: `by_adapter`, in request order."""

    PROTO: ClassVar[str] = "adaptgate.v1.ClassifyResponse"
    results: list[Classification]
    adapter: str
    by_adapter: list[AdapterResults] = field(default_factory=list)

    @classmethod
    def from_proto(cls, m: classifier_pb2.ClassifyResponse) -> Classifications:
        return cls([Classification.from_proto(r) for r in m.results], m.adapter,
                   [AdapterResults.from_proto(a) for a in m.by_adapter])


@dataclass(frozen=True)
class Adapter:
    PROTO: ClassVar[str] = "adaptgate.v1.Adapter"
    ref: str
    version: int
    tenant: str
    name: str
    aliases: list[str]
    labels: list[str]
    rank: int
    target_modules: list[str]
    loaded: bool
    size_bytes: int
    created_at: float
    source: str
    pinned: bool

    @classmethod
    def from_proto(cls, m: adapters_pb2.Adapter) -> Adapter:
        return cls(m.ref, m.version, m.tenant, m.name, list(m.aliases), list(m.labels), m.rank,
                   list(m.target_modules), m.loaded, m.size_bytes, m.created_at, m.source, m.pinned)


@dataclass(frozen=True)
class DeletedAdapters:
    PROTO: ClassVar[str] = "adaptgate.v1.DeleteAdapterResponse"
    deleted: list[str]
    aliases_removed: list[str]

    @classmethod
    def from_proto(cls, m: adapters_pb2.DeleteAdapterResponse) -> DeletedAdapters:
        return cls(list(m.deleted), list(m.aliases_removed))


@dataclass(frozen=True)
class LabelCount:
    PROTO: ClassVar[str] = "adaptgate.v1.LabelCount"
    label: str
    count: int

    @classmethod
    def from_proto(cls, m: datasets_pb2.LabelCount) -> LabelCount:
        return cls(m.label, m.count)


@dataclass(frozen=True)
class Dataset:
    PROTO: ClassVar[str] = "adaptgate.v1.Dataset"
    id: str
    name: str
    tenant: str
    rows: int
    labels: list[LabelCount]
    warnings: list[str]
    created_at: float
    size_bytes: int

    @classmethod
    def from_proto(cls, m: datasets_pb2.Dataset) -> Dataset:
        return cls(m.id, m.name, m.tenant, m.rows, [LabelCount.from_proto(c) for c in m.labels], list(m.warnings),
                   m.created_at, m.size_bytes)


@dataclass(frozen=True)
class JobMetrics:
    PROTO: ClassVar[str] = "adaptgate.v1.JobMetrics"
    accuracy: float = 0.0
    macro_f1: float = 0.0
    loss: float = 0.0
    # With an out_of_scope_label:
    abstain_threshold: float = 0.0
    out_of_scope_recall: float = 0.0
    in_scope_precision: float = 0.0
    in_scope_coverage: float = 0.0
    in_scope_accuracy: float = 0.0

    @classmethod
    def from_proto(cls, m: finetune_pb2.JobMetrics) -> JobMetrics:
        return cls(m.accuracy, m.macro_f1, m.loss, m.abstain_threshold, m.out_of_scope_recall, m.in_scope_precision,
                   m.in_scope_coverage, m.in_scope_accuracy)


@dataclass(frozen=True)
class ConfusionRow:
    PROTO: ClassVar[str] = "adaptgate.v1.ConfusionRow"
    counts: list[int]

    @classmethod
    def from_proto(cls, m: finetune_pb2.ConfusionRow) -> ConfusionRow:
        return cls(list(m.counts))


@dataclass(frozen=True)
class ConfusionMatrix:
    """Rows are true labels, columns predicted labels, both in `labels` order."""

    PROTO: ClassVar[str] = "adaptgate.v1.ConfusionMatrix"
    labels: list[str]
    rows: list[ConfusionRow]

    @classmethod
    def from_proto(cls, m: finetune_pb2.ConfusionMatrix) -> ConfusionMatrix:
        return cls(list(m.labels), [ConfusionRow.from_proto(r) for r in m.rows])

    def array(self) -> np.ndarray:
        return np.array([r.counts for r in self.rows], dtype=np.int64).reshape(len(self.rows), len(self.labels))


@dataclass(frozen=True)
class BlockLearningRate:
    PROTO: ClassVar[str] = "adaptgate.v1.BlockLearningRate"
    block: int
    alpha: float
    multiplier: float
    learning_rate: float

    @classmethod
    def from_proto(cls, m: finetune_pb2.BlockLearningRate) -> BlockLearningRate:
        return cls(m.block, m.alpha, m.multiplier, m.learning_rate)


@dataclass(frozen=True)
class MethodChoice:
    PROTO: ClassVar[str] = "adaptgate.v1.MethodChoice"
    chosen: str
    reason: str

    @classmethod
    def from_proto(cls, m: finetune_pb2.MethodChoice) -> MethodChoice:
        return cls(m.chosen, m.reason)


@dataclass(frozen=True)
class JobDetails:
    """Each part is None (or empty) until the job has produced it."""

    PROTO: ClassVar[str] = "adaptgate.v1.JobDetails"
    confusion: ConfusionMatrix | None = None
    blocks: list[BlockLearningRate] = field(default_factory=list)
    method: MethodChoice | None = None

    @classmethod
    def from_proto(cls, m: finetune_pb2.JobDetails) -> JobDetails:
        return cls(ConfusionMatrix.from_proto(m.confusion) if m.HasField("confusion") else None,
                   [BlockLearningRate.from_proto(b) for b in m.blocks],
                   MethodChoice.from_proto(m.method) if m.HasField("method") else None)


@dataclass(frozen=True)
class Job:
    PROTO: ClassVar[str] = "adaptgate.v1.Job"
    id: str
    state: JobState
    adapter: str
    tenant: str
    dataset_id: str
    adapter_name: str
    method: str
    error: str
    progress: float
    metrics: JobMetrics
    created_at: float
    updated_at: float
    details: JobDetails
    auto: bool
    validation_dataset_id: str = ""
    out_of_scope_label: str = ""

    @classmethod
    def from_proto(cls, m: finetune_pb2.Job) -> Job:
        return cls(m.id, JobState(m.state), m.adapter, m.tenant, m.dataset_id, m.adapter_name, m.method, m.error,
                   m.progress, JobMetrics.from_proto(m.metrics), m.created_at, m.updated_at,
                   JobDetails.from_proto(m.details), m.auto, m.validation_dataset_id, m.out_of_scope_label)


@dataclass(frozen=True)
class JobEvent:
    PROTO: ClassVar[str] = "adaptgate.v1.JobEvent"
    job_id: str
    seq: int
    time: float
    state: JobState
    kind: str  # "state" | "progress" | "eval" | "log"
    message: str
    progress: float
    metrics: JobMetrics
    eta_seconds: float
    details: JobDetails

    @classmethod
    def from_proto(cls, m: finetune_pb2.JobEvent) -> JobEvent:
        return cls(m.job_id, m.seq, m.time, JobState(m.state), m.kind, m.message, m.progress,
                   JobMetrics.from_proto(m.metrics), m.eta_seconds, JobDetails.from_proto(m.details))
