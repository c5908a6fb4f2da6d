"""adaptgate.v1.Embeddings."""

from __future__ import annotations

import grpc

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, deadline_of, unary
from adaptgate.engine.pooling import Pooling
from adaptgate.inference import Inference
from adaptgate.v1 import embeddings_pb2 as pb
from adaptgate.v1 import embeddings_pb2_grpc

POOLING = {pb.POOLING_UNSPECIFIED: None, pb.POOLING_MEAN: Pooling.MEAN, pb.POOLING_CLS: Pooling.CLS, pb.POOLING_LAST_TOKEN: Pooling.LAST_TOKEN}


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, runtime: RpcRuntime, inference: Inference, model_name: str) -> None:
        self.runtime = runtime
        self.inference = inference
        self.model_name = model_name

    @unary
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, principal: Principal) -> pb.EmbedResponse:
        ref = principal.adapter(request.adapter) if request.adapter else None
        normalize = request.normalize if request.HasField("normalize") else True
        with self.runtime.admission.admit(principal.tenant):
            out = await self.inference.embed(
                list(request.texts), ref, POOLING.get(request.pooling), normalize, request.truncate, deadline_of(context)
            )
        self.runtime.metrics.texts.labels("Embed").inc(len(out.vectors))
        if request.encoding == pb.ENCODING_BYTES_F32:
            embeddings = [pb.Embedding(packed=v.astype("<f4").tobytes(), tokens=n) for v, n in zip(out.vectors, out.tokens)]
        else:
            embeddings = [pb.Embedding(values=v, tokens=n) for v, n in zip(out.vectors, out.tokens)]
        return pb.EmbedResponse(embeddings=embeddings, model=self.model_name)
