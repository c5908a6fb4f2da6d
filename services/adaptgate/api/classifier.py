"""adaptgate.v1.Classifier."""

from __future__ import annotations

import grpc
import numpy as np

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, deadline_of, unary
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
        ref = principal.adapter(request.adapter)
        out = await self.inference.classify(list(request.texts), ref, request.truncate, deadline_of(context))
        self.runtime.metrics.texts.labels("Classify").inc(len(out.probabilities))
        results = [to_classification(p, out.record.labels, request.top_k) for p in out.probabilities]
        return pb.ClassifyResponse(results=results, adapter=str(out.record.ref))
