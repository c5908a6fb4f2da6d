"""Replica roles (RELIABILITY: roles): an inference replica answers every write, dataset and job method
with FAILED_PRECONDITION naming the control service, and never opens the job database, the dataset
store or Ray; control and all serve every method. Methods are enumerated from the proto descriptors,
so a method added to a .proto is covered without editing these tests."""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

import adaptgate.v1
from adaptgate.api import roles
from adaptgate.server import build
from adaptgate.settings import Settings

CONTROL_ADDRESS = "adaptgate-control.adaptgate:50051"
TOKEN, ADMIN = "acme-token", "admin-token"
WRITE_PREFIXES = ("Upload", "Set", "Delete", "Submit", "Cancel")


def all_methods() -> list[MethodDescriptor]:
    """Every method of every service in every generated module, found without the registry's own list."""
    modules = [importlib.import_module(f"adaptgate.v1.{m.name}") for m in pkgutil.iter_modules(adaptgate.v1.__path__)]
    return [
        method
        for module in modules if module.__name__.endswith("_pb2")
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def test_every_api_method_belongs_to_one_plane_and_writes_are_control() -> None:
    methods = all_methods()
    assert {m.containing_service.name for m in methods} >= {"Embeddings", "Classifier", "Adapters", "Datasets", "Finetune"}
    assert sorted(roles.api_methods()) == sorted(path_of(m) for m in methods), "the registry sees every generated service"
    for method in methods:
        plane = roles.plane_of(path_of(method))
        if method.name.startswith(WRITE_PREFIXES) or method.containing_service.name in ("Datasets", "Finetune"):
            assert plane is roles.Plane.CONTROL, f"{path_of(method)} writes or needs the job database: control only"
    inference = {m.name for m in methods if roles.plane_of(path_of(m)) is roles.Plane.INFERENCE}
    assert {"Embed", "EmbedStream", "Classify", "GetAdapter", "ListAdapters"} <= inference


def test_roles_of_the_settings_are_the_roles_the_registry_knows() -> None:
    assert set(get_args(Settings.model_fields["role"].annotation)) == set(roles.ROLE_PLANES)
    assert Settings().role == "all"


def test_role_and_control_address_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTGATE_ROLE", "inference")
    monkeypatch.setenv("ADAPTGATE_CONTROL_ADDRESS", CONTROL_ADDRESS)
    settings = Settings()
    assert (settings.role, settings.control_address) == ("inference", CONTROL_ADDRESS)
    monkeypatch.setenv("ADAPTGATE_ROLE", "training")
    with pytest.raises(ValueError, match="role"):
        Settings()


def settings_for(tmp_path: Path, model_dir: Path, role: str) -> Settings:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {TOKEN: {"tenant": "acme"}, ADMIN: {"tenant": "ops", "admin": True}}}))
    return Settings(
        role=role, control_address=CONTROL_ADDRESS, host="127.0.0.1", port=0, metrics_port=-1,
        data_dir=tmp_path / "data", tokens_file=tokens, base_model=str(model_dir), device="cpu", dtype="float32",
        cpu_kernels="off", reflection=False, ray_address=None,
    )


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, token: str) -> Any:
    """Calls `method` with an empty request (one empty chunk when it streams requests)."""
    request_type, response_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    kinds = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream,
    }
    multicallable = kinds[(method.client_streaming, method.server_streaming)](
        path_of(method), request_serializer=request_type.SerializeToString, response_deserializer=response_type.FromString
    )

    async def chunks() -> AsyncIterator[Any]:
        yield request_type()

    request = chunks() if method.client_streaming else request_type()
    metadata = (("authorization", f"Bearer {token}"),)
    if method.server_streaming:
        return [item async for item in multicallable(request, metadata=metadata, timeout=30)]
    return await multicallable(request, metadata=metadata, timeout=30)


async def test_inference_replica_refuses_every_control_method_and_opens_no_control_state(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    settings = settings_for(tmp_path, tiny_bert_dir, "inference")
    gateway = await build(settings)
    try:
        assert gateway.jobs is None and gateway.runner is None, "an inference replica builds no job manager and no Ray runner"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            control = [m for m in all_methods() if roles.plane_of(path_of(m)) is roles.Plane.CONTROL]
            assert {m.name for m in control} >= {"UploadAdapter", "SetAlias", "UploadDataset", "SubmitJob", "WatchJob"}
            for method in control:
                for token in (TOKEN, ADMIN):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(channel, method, token)
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, path_of(method)
                    details = info.value.details() or ""
                    assert CONTROL_ADDRESS in details and method.name in details, details
                # Authentication still comes first: a caller without a valid token learns nothing more.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(channel, method, "not-a-token")
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, path_of(method)
            # The inference plane is served for real.
            embed = roles.api_methods()["/adaptgate.v1.Embeddings/Embed"]
            request = GetMessageClass(embed.input_type)(texts=["served here"])
            response = await channel.unary_unary(
                path_of(embed), request_serializer=type(request).SerializeToString,
                response_deserializer=GetMessageClass(embed.output_type).FromString,
            )(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
            assert len(response.embeddings) == 1
            listed = await call(channel, roles.api_methods()["/adaptgate.v1.Adapters/ListAdapters"], TOKEN)
            assert list(listed.adapters) == []
            # Health tells routers the same: services with nothing served here are NOT_SERVING.
            check = health_pb2_grpc.HealthStub(channel).Check
            status = {
                name: (await check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status
                for name in ("", "adaptgate.v1.Embeddings", "adaptgate.v1.Adapters", "adaptgate.v1.Datasets", "adaptgate.v1.Finetune")
            }
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            assert status == {"": serving, "adaptgate.v1.Embeddings": serving, "adaptgate.v1.Adapters": serving,
                              "adaptgate.v1.Datasets": not_serving, "adaptgate.v1.Finetune": not_serving}
    finally:
        await gateway.stop(0)
    assert not settings.database_path.exists(), "an inference replica must not create a job database"
    assert not settings.datasets_dir.exists(), "an inference replica must not create a dataset store"
    assert not settings.checkpoints_dir.exists()


@pytest.mark.parametrize("role", ["control", "all"])
async def test_control_and_all_replicas_serve_the_control_methods(tmp_path: Path, tiny_bert_dir: Path, role: str) -> None:
    settings = settings_for(tmp_path, tiny_bert_dir, role)
    gateway = await build(settings)
    try:
        assert gateway.jobs is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            methods = roles.api_methods()
            assert list((await call(channel, methods["/adaptgate.v1.Datasets/ListDatasets"], TOKEN)).datasets) == []
            assert list((await call(channel, methods["/adaptgate.v1.Finetune/ListJobs"], TOKEN)).jobs) == []
            with pytest.raises(grpc.aio.AioRpcError) as info:  # reaches the real handler: the empty name is refused
                await call(channel, methods["/adaptgate.v1.Adapters/UploadAdapter"], TOKEN)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            embed = await call(channel, methods["/adaptgate.v1.Adapters/ListAdapters"], TOKEN)
            assert list(embed.adapters) == []
    finally:
        await gateway.stop(0)
    assert settings.database_path.exists()
