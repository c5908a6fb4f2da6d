"""Replica roles: which API methods a replica serves, and the one answer it gives to the others.

The API splits into two planes. The inference plane is what a stateless replica with a read-only
adapter store answers: Embed, EmbedStream, Classify and the adapter reads (Get, List, and Load/Unload,
which touch only the answering pod's engine slots). Everything else is the control plane: writes to
the adapter store, datasets and finetuning jobs, which need the job database, the dataset store and
Ray, all of which live on the one control replica. The inference plane is an allowlist, so a method
added to a .proto belongs to the control plane until it is listed here: a new write method is refused
on inference replicas, never half served (an upload to a read-only store, a job on a pod's local Ray).

Roles (Settings.role):
- all: both planes; one machine.
- inference: the inference plane; control-plane methods answer FAILED_PRECONDITION with a sentence
  naming the control service (Settings.control_address), after authentication, and the server opens
  no job database, dataset store or Ray runner.
- control: both planes. The control replica loads the base model anyway (a job needs its directory,
  an upload its shapes), so it also answers Embed and Classify: one address is enough for a client
  that uploads, trains and then checks the result.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Awaitable, Callable, Mapping
from functools import cache
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, server_stream, unary
from adaptgate.errors import FailedPrecondition
from adaptgate.settings import Role
from adaptgate.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

API_MODULES = (embeddings_pb2, classifier_pb2, adapters_pb2, datasets_pb2, finetune_pb2)


class Plane(enum.Enum):
    INFERENCE = "inference"
    CONTROL = "control"


ROLE_PLANES: dict[Role, frozenset[Plane]] = {
    "all": frozenset(Plane),
    "inference": frozenset({Plane.INFERENCE}),
    "control": frozenset(Plane),
}

# The inference plane, by service and method name; every other API method is control plane.
INFERENCE_PLANE: dict[str, tuple[str, ...]] = {
    "adaptgate.v1.Embeddings": ("Embed", "EmbedStream"),
    "adaptgate.v1.Classifier": ("Classify",),
    "adaptgate.v1.Adapters": ("GetAdapter", "ListAdapters", "LoadAdapter", "UnloadAdapter"),
}

HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_path(method: MethodDescriptor) -> str:
    """The name gRPC routes by: /package.Service/Method."""
    return f"/{method.containing_service.full_name}/{method.name}"


@cache
def api_methods() -> dict[str, MethodDescriptor]:
    """Every method of the public API by its path, read from the compiled protos."""
    methods = {
        method_path(method): method
        for module in API_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    unknown = {f"/{s}/{m}" for s, names in INFERENCE_PLANE.items() for m in names} - set(methods)
    if unknown:
        raise RuntimeError(f"the inference plane names methods the protos do not define: {sorted(unknown)}")
    return methods


def plane_of(path: str) -> Plane:
    service, _, name = path.lstrip("/").partition("/")
    return Plane.INFERENCE if name in INFERENCE_PLANE.get(service, ()) else Plane.CONTROL


def serves(role: Role, plane: Plane) -> bool:
    return plane in ROLE_PLANES[role]


def serves_service(role: Role, service: str) -> bool:
    """Whether any method of `service` (a full name) is served: its health answer (NOT_SERVING otherwise)."""
    return any(serves(role, plane_of(path)) for path in api_methods() if path.startswith(f"/{service}/"))


def refusal(method: MethodDescriptor, control_address: str) -> str:
    where = f"the control service at {control_address}" if control_address else "the control service (a gateway whose role is control or all)"
    return (
        f"{method.containing_service.name}.{method.name} is served by {where}, not by this inference replica, "
        "which answers only Embed, Classify and adapter reads: send writes, datasets and jobs there"
    )


class _Refuser:
    """Holds what the RPC wrappers read (`runtime`) and the sentence of one refused method."""

    def __init__(self, runtime: RpcRuntime, sentence: str) -> None:
        self.runtime = runtime
        self.sentence = sentence


def _behaviour(method: MethodDescriptor) -> Callable[..., Any]:
    """A servicer method named like `method` that refuses: the shared wrappers authenticate and count it."""
    if method.server_streaming:

        async def refuse_stream(self: _Refuser, request: Any, context: grpc.aio.ServicerContext, principal: Principal) -> Any:
            raise FailedPrecondition(self.sentence)
            yield  # an async generator, as server_stream expects

        refuse_stream.__name__ = method.name
        return server_stream(refuse_stream)

    async def refuse(self: _Refuser, request: Any, context: grpc.aio.ServicerContext, principal: Principal) -> Any:
        raise FailedPrecondition(self.sentence)

    refuse.__name__ = method.name
    return unary(refuse)


def refusing_handler(method: MethodDescriptor, runtime: RpcRuntime, control_address: str) -> grpc.RpcMethodHandler:
    """A handler built from the descriptor alone: no servicer (and nothing it would open) is needed."""
    behaviour = types.MethodType(_behaviour(method), _Refuser(runtime, refusal(method, control_address)))
    return HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)](
        behaviour,
        request_deserializer=GetMessageClass(method.input_type).FromString,
        response_serializer=GetMessageClass(method.output_type).SerializeToString,
    )


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Answers the methods this replica's role does not serve, before any registered servicer is looked up."""

    def __init__(self, refused: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.refused = dict(refused)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = self.refused.get(handler_call_details.method)
        return handler if handler is not None else await continuation(handler_call_details)


def role_interceptor(role: Role, control_address: str, runtime: RpcRuntime) -> RoleInterceptor:
    refused = {
        path: refusing_handler(method, runtime, control_address)
        for path, method in api_methods().items()
        if not serves(role, plane_of(path))
    }
    return RoleInterceptor(refused)
