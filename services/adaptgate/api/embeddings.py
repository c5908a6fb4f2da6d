"""adaptgate.v1.Embeddings."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import grpc

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, deadline_of, server_stream, unary
from adaptgate.engine.pooling import Pooling
from adaptgate.inference import Inference
from adaptgate.observability import stages
from adaptgate.v1 import embeddings_pb2 as pb
from adaptgate.v1 import embeddings_pb2_grpc

# EmbedStream chunks in flight at once: enough to keep the batcher fed, few enough to bound memory.
STREAM_WINDOW = 4
POOLING = {pb.POOLING_UNSPECIFIED: None, pb.POOLING_MEAN: Pooling.MEAN, pb.POOLING_CLS: Pooling.CLS, pb.POOLING_LAST_TOKEN: Pooling.LAST_TOKEN}


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, runtime: RpcRuntime, inference: Inference, model_name: str) -> None:
        self.runtime = runtime
        self.inference = inference
        self.model_name = model_name

    @unary
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, principal: Principal) -> pb.EmbedResponse:
        return await self._embed(request, context, principal, "Embed")

    @server_stream
    async def EmbedStream(
        self, requests: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext, principal: Principal
    ) -> AsyncIterator[pb.EmbedResponse]:
        """Answers in order while up to STREAM_WINDOW chunks run; a failed chunk ends the stream with its status."""
        running: deque[asyncio.Task[pb.EmbedResponse]] = deque()
        sent = 0
        try:
            async for request in requests:
                running.append(asyncio.ensure_future(self._chunk(sent, request, context, principal)))
                sent += 1
                if len(running) >= STREAM_WINDOW:
                    yield await running.popleft()
            while running:
                yield await running.popleft()
        finally:
            for task in running:
                task.cancel()

    async def _chunk(
        self, index: int, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.EmbedResponse:
        response = await self._embed(request, context, principal, "EmbedStream")
        response.chunk = index
        return response

    async def _embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, principal: Principal, method: str
    ) -> pb.EmbedResponse:
        ref = principal.adapter(request.adapter) if request.adapter else None
        normalize = request.normalize if request.HasField("normalize") else None  # None: the model's own
        prompt_name = request.prompt_name if request.HasField("prompt_name") else None  # None: the model's default
        texts, deadline = list(request.texts), deadline_of(context)
        stages.mark("resolve")
        async with self.runtime.admission.admitted(principal.tenant, len(texts), (ref,) if ref else (), deadline):
            stages.mark("admission")
            out = await self.inference.embed(
                texts, ref, POOLING.get(request.pooling), normalize, request.truncate, deadline, principal.tenant,
                prompt_name,
            )
        self.runtime.metrics.texts.labels(method).inc(len(out.vectors))
        if request.encoding == pb.ENCODING_BYTES_F32:
            embeddings = [pb.Embedding(packed=v.astype("<f4").tobytes(), tokens=n) for v, n in zip(out.vectors, out.tokens)]
        else:
            embeddings = [pb.Embedding(values=v, tokens=n) for v, n in zip(out.vectors, out.tokens)]
        response = pb.EmbedResponse(embeddings=embeddings, model=self.model_name)
        stages.mark("answer")
        return response
