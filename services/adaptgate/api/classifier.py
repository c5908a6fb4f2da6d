"""adaptgate.v1.Classifier."""

from __future__ import annotations

import grpc
import numpy as np

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, deadline_of, unary
from adaptgate.errors import InvalidArgument
from adaptgate.inference import Inference
from adaptgate.v1 import classifier_pb2 as pb
from adaptgate.v1 import classifier_pb2_grpc


def to_classification(probs: np.ndarray, labels: list[str], top_k: int) -> pb.Classification:
    order = np.argsort(-probs, kind="stable")
    if top_k:
        order = order[:top_k]
    scores = [pb.LabelScore(label=labels[i], score=float(probs[i])) for i in order]
    return pb.Classification(label=scores[0].label, score=scores[0].score, scores=scores)


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self, runtime: RpcRuntime, inference: Inference) -> None:
        self.runtime = runtime
        self.inference = inference

    @unary
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.ClassifyResponse:
        if request.adapter and request.adapters:
            raise InvalidArgument("give either adapter or adapters, not both")
        names = list(request.adapters) or [request.adapter]
        refs = [principal.adapter(name) for name in names]
        texts, deadline = list(request.texts), deadline_of(context)
        # Rows: one forward per text and adapter at most (head-only adapters share one, known only once resolved).
        async with self.runtime.admission.admitted(principal.tenant, len(texts) * len(refs), refs, deadline):
            answers = await self.inference.classify(texts, refs, request.truncate, deadline, principal.tenant)
        self.runtime.metrics.texts.labels("Classify").inc(len(request.texts) * len(answers))
        by_adapter = [
            pb.AdapterResults(
                adapter=str(a.record.ref),
                results=[to_classification(p, a.record.labels, request.top_k) for p in a.probabilities],
            )
            for a in answers
        ]
        if request.adapters:
            return pb.ClassifyResponse(by_adapter=by_adapter)
        return pb.ClassifyResponse(results=by_adapter[0].results, adapter=by_adapter[0].adapter)
