"""adaptgate.v1.Classifier."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from adaptgate.adapters.store import AdapterRecord
from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, deadline_of, unary
from adaptgate.errors import InvalidArgument
from adaptgate.inference import Inference
from adaptgate.observability import stages
from adaptgate.v1 import classifier_pb2 as pb
from adaptgate.v1 import classifier_pb2_grpc


DEFAULT_ABSTAIN_LABEL = "out_of_scope"
# Heads up to this many labels are ordered by Python's sort (to_classifications).
PYTHON_SORT_LABELS = 64


@dataclass(frozen=True)
class Abstain:
    """Answer `label` instead when the top score is below `threshold` (None: never), or when the top
    label is the out-of-scope class the adapter learnt (`learnt`)."""

    threshold: float | None = None
    label: str = DEFAULT_ABSTAIN_LABEL
    learnt: str = ""

    @classmethod
    def of(cls, request: pb.ClassifyRequest, record: AdapterRecord) -> Abstain:
        """The request's threshold and label, else the adapter's own (a job's calibration), else never."""
        threshold = request.abstain_below if request.HasField("abstain_below") else record.abstain_threshold
        label = request.abstain_label.strip() or record.abstain_label or DEFAULT_ABSTAIN_LABEL
        return cls(threshold, label, record.abstain_label)


def to_classification(probs: np.ndarray, labels: list[str], top_k: int, abstain: Abstain = Abstain()) -> pb.Classification:
    """One row's answer (probs [labels]): the batch's, for a batch of one."""
    return to_classifications(probs[np.newaxis, :], labels, top_k, abstain)[0]


def to_classifications(
    probs: np.ndarray, labels: list[str], top_k: int, abstain: Abstain = Abstain()
) -> list[pb.Classification]:
    """Every row's answer (probs [rows, labels]): the order and the scores turned into Python lists at once,
    so the per-row work left is building the messages."""
    rows = probs.tolist()
    threshold, learnt = abstain.threshold, abstain.learnt
    out = []
    for row_order, row_probs in zip(_orders(probs, rows, top_k), rows):
        top, best = labels[row_order[0]], row_probs[row_order[0]]
        abstained = (threshold is not None and best < threshold) or (bool(learnt) and top == learnt)
        scored = [pb.LabelScore(label=labels[i], score=row_probs[i]) for i in row_order]
        out.append(pb.Classification(label=abstain.label if abstained else top, score=best, scores=scored, abstained=abstained))
    return out


def _orders(probs: np.ndarray, rows: list[list[float]], top_k: int) -> list[list[int]]:
    """Each row's labels by falling score, ties in label order. Small heads sort in Python: numpy's argsort
    lets go of the GIL, and on a busy event loop each release may hand it to the engine thread for a whole
    switch interval; NaN scores (which Python cannot order) and large heads take one stable argsort."""
    if probs.shape[1] <= PYTHON_SORT_LABELS and not np.isnan(probs).any():
        orders = [sorted(range(len(row)), key=row.__getitem__, reverse=True) for row in rows]  # stable, as argsort
        return [order[:top_k] for order in orders] if top_k else orders
    order = np.argsort(-probs, axis=1, kind="stable")
    return (order[:, :top_k] if top_k else order).tolist()


async def classify(
    runtime: RpcRuntime, inference: Inference, principal: Principal, request: pb.ClassifyRequest, deadline: float | None
) -> pb.ClassifyResponse:
    """One Classify call, whichever API received it: gRPC and HTTP share its admission, limits and answers."""
    if request.adapter and request.adapters:
        raise InvalidArgument("give either adapter or adapters, not both")
    if request.HasField("abstain_below") and not 0.0 <= request.abstain_below <= 1.0:  # NaN included
        raise InvalidArgument(f"abstain_below must be from 0 to 1; got {request.abstain_below}")
    names = list(request.adapters) or [request.adapter]
    refs = [principal.adapter(name) for name in names]
    texts = list(request.texts)
    stages.mark("resolve")
    # Rows: one forward per text and adapter at most (head-only adapters share one, known only once resolved).
    async with runtime.admission.admitted(principal.tenant, len(texts) * len(refs), refs, deadline):
        stages.mark("admission")
        answers = await inference.classify(texts, refs, request.truncate, deadline, principal.tenant)
    runtime.metrics.texts.labels("Classify").inc(len(request.texts) * len(answers))
    by_adapter = [
        pb.AdapterResults(
            adapter=str(a.record.ref),
            results=to_classifications(np.stack(a.probabilities), a.record.labels, request.top_k, Abstain.of(request, a.record)),
        )
        for a in answers
    ]
    if request.adapters:
        response = pb.ClassifyResponse(by_adapter=by_adapter)
    else:
        response = pb.ClassifyResponse(results=by_adapter[0].results, adapter=by_adapter[0].adapter)
    stages.mark("answer")
    return response


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self, runtime: RpcRuntime, inference: Inference) -> None:
        self.runtime = runtime
        self.inference = inference

    @unary
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.ClassifyResponse:
        return await classify(self.runtime, self.inference, principal, request, deadline_of(context))
