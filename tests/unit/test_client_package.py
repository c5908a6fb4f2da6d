"""adaptgate_client against the .proto files themselves: every RPC has a client method (sync and async) whose
parameters cover its request's fields, a CLI subcommand with a documented argument per field, and a typed
result class per response message with every field, converted faithfully. Walking the descriptors means a new
field or RPC without its client method, flag or result field fails here. Also: the checked-in generated
modules are current, and the server's adaptgate.v1 is the client's modules, not a second copy."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

import adaptgate_client
from adaptgate_client import AsyncClient, Client, types
from adaptgate_client.cli import COMMAND_RPCS, FIELD_DESTS, build_parser
from adaptgate_client.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

REPO = Path(__file__).resolve().parents[2]
FILES: list[FileDescriptor] = [m.DESCRIPTOR for m in (adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2)]
METHODS = [m for f in FILES for s in f.services_by_name.values() for m in s.methods]
# Client parameters not named after their field: `message.field` -> parameter.
PARAMS = {
    "adaptgate.v1.Embeddings.EmbedStream:texts": "chunks",  # chunks of texts, one request each
    "adaptgate.v1.UploadAdapterChunk.filename": "directory",
    "adaptgate.v1.UploadAdapterChunk.data": "directory",
    "adaptgate.v1.UploadDatasetChunk.data": "path",
    "adaptgate.v1.DatasetRef.id": "dataset_id",
    "adaptgate.v1.JobRef.id": "job_id",
}
# AdapterRef serves several RPCs; `force` is DeleteAdapter's only (the .proto says so).
NOT_USED = {"adaptgate.v1.Adapters.GetAdapter:force", "adaptgate.v1.Adapters.UnloadAdapter:force"}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_the_proto_files_are_the_ones_walked() -> None:
    on_disk = {p.name for p in (REPO / "protos" / "adaptgate" / "v1").glob("*.proto")}
    assert {Path(f.name).name for f in FILES} == on_disk, "a new .proto: add its module to FILES"


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_every_rpc_is_a_client_method_taking_every_request_field(cls: type, method: Any) -> None:
    function = getattr(cls, snake(method.name), None)
    assert function is not None, f"{cls.__name__} has no {snake(method.name)}() for {method.full_name}"
    params = set(inspect.signature(function).parameters)
    for field in method.input_type.fields:
        key = f"{method.input_type.full_name}.{field.name}"
        if f"{method.full_name}:{field.name}" in NOT_USED:
            continue
        wanted = PARAMS.get(f"{method.full_name}:{field.name}", PARAMS.get(key, field.name))
        assert wanted in params, f"{cls.__name__}.{snake(method.name)} does not take {key}"


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    return dict(sub.choices)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_every_request_field_has_a_documented_cli_argument(method: Any) -> None:
    owners = [name for name, rpcs in COMMAND_RPCS.items() if method.full_name in rpcs]
    assert owners, f"no CLI subcommand calls {method.full_name} (COMMAND_RPCS)"
    parser = commands()[owners[0]]
    help_text = parser.format_help()
    actions = {a.dest: a for a in parser._actions}  # noqa: SLF001
    for field in method.input_type.fields:
        key = f"{method.input_type.full_name}.{field.name}"
        action = actions.get(FIELD_DESTS.get(key, field.name))
        assert action is not None, f"`{owners[0]}` has no argument for {key}"
        assert action.help and action.help != argparse.SUPPRESS, f"`{owners[0]}`'s argument for {key} has no help"
        shown = action.option_strings[0] if action.option_strings else action.dest
        assert shown in help_text, f"`{owners[0]} --help` does not show {key}"
        if field.enum_type is not None and action.choices is not None:
            names = {v.name.lower().removeprefix(snake(field.enum_type.name) + "_") for v in field.enum_type.values}
            assert set(action.choices) == names, f"{key}: choices {sorted(action.choices)} are not the enum's {sorted(names)}"


def test_the_server_cli_offers_the_client_commands_as_they_are() -> None:
    from adaptgate.cli import build_parser as server_parser

    (sub,) = [a for a in server_parser()._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    ours = commands()
    assert set(sub.choices) == set(ours) | {"serve"}
    for name, parser in ours.items():
        assert {a.dest for a in sub.choices[name]._actions} == {a.dest for a in parser._actions}  # noqa: SLF001


def result_classes() -> dict[str, type]:
    return {c.PROTO: c for _, c in inspect.getmembers(types, inspect.isclass) if dataclasses.is_dataclass(c)}


def response_messages() -> list[Descriptor]:
    seen: dict[str, Descriptor] = {}

    def walk(message: Descriptor) -> None:
        if message.full_name not in seen:
            seen[message.full_name] = message
            for field in message.fields:
                if field.message_type is not None:
                    walk(field.message_type)

    for method in METHODS:
        walk(method.output_type)
    return list(seen.values())


def fill(message: Any, depth: int = 0) -> Any:
    """Every field set to a distinct value, repeated fields to two elements, nested messages recursively."""
    counter = iter(range(1, 10_000))
    for field in message.DESCRIPTOR.fields:
        repeated = field.is_repeated
        for _ in range(2 if repeated else 1):
            n = next(counter) + depth * 100
            if field.message_type is not None:
                fill(getattr(message, field.name).add() if repeated else getattr(message, field.name), depth + 1)
                continue
            if field.enum_type is not None:
                value: Any = field.enum_type.values[-1].number
            elif field.type == FieldDescriptor.TYPE_BOOL:
                value = True
            elif field.type == FieldDescriptor.TYPE_STRING:
                value = f"{field.name}-{n}"
            elif field.type == FieldDescriptor.TYPE_BYTES:
                value = np.array([n, n + 0.5], dtype="<f4").tobytes()
            elif field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                value = n + 0.25
            else:
                value = n
            if repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)
    return message


def same(result: Any, message: Any) -> None:
    """Field by field, recursively: the dataclass holds what the message held."""
    for field in message.DESCRIPTOR.fields:
        ours, theirs = getattr(result, field.name), getattr(message, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                assert len(ours) == len(theirs), field.full_name
                for a, b in zip(ours, theirs):
                    same(a, b)
            else:
                same(ours, theirs)
        elif field.is_repeated:
            assert list(ours) == list(theirs), field.full_name
        elif field.type == FieldDescriptor.TYPE_FLOAT:
            assert ours == pytest.approx(theirs), field.full_name
        else:
            assert ours == theirs, field.full_name
            if field.enum_type is not None:
                assert ours.name == field.enum_type.values_by_number[theirs].name.removeprefix("JOB_STATE_"), field.full_name


def is_list_response(message: Descriptor) -> bool:
    """List* responses become plain lists of results: right only while the list is all they hold."""
    return message.name.startswith("List") and message.name.endswith("Response")


def test_list_responses_hold_only_their_list() -> None:
    for message in filter(is_list_response, response_messages()):
        assert len(message.fields) == 1 and message.fields[0].is_repeated, \
            f"{message.full_name} gained a field: the client's list_* method drops it; return a result class"


@pytest.mark.parametrize("message", [m for m in response_messages() if not is_list_response(m) and m.full_name not in
                                     ("adaptgate.v1.EmbedResponse", "adaptgate.v1.Embedding")], ids=lambda m: m.full_name)
def test_every_response_message_has_a_typed_result_with_all_its_fields(message: Descriptor) -> None:
    cls = result_classes().get(message.full_name)
    assert cls is not None, f"adaptgate_client.types has no result class for {message.full_name}"
    assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in message.fields]
    proto = fill(message._concrete_class())  # noqa: SLF001
    same(cls.from_proto(proto), proto)


def test_embeddings_are_float32_arrays_whichever_encoding() -> None:
    packed = fill(embeddings_pb2.EmbedResponse())
    floats = embeddings_pb2.EmbedResponse(model="m", chunk=3, embeddings=[
        embeddings_pb2.Embedding(values=[1.5, -2.0], tokens=4), embeddings_pb2.Embedding(values=[0.25, 8.0], tokens=5)])
    result = types.Embeddings.from_proto(packed)
    assert set(f.name for f in packed.DESCRIPTOR.fields) == {"embeddings", "model", "chunk"}, "a new field: add it to Embeddings"
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (2, 2)
    assert result.vectors.tolist() == [np.frombuffer(e.packed, "<f4").tolist() for e in packed.embeddings]
    assert result.tokens == [e.tokens for e in packed.embeddings] and result.model == packed.model and result.chunk == packed.chunk
    plain = types.Embeddings.from_proto(floats)
    assert plain.vectors.dtype == np.float32 and plain.vectors.tolist() == [[1.5, -2.0], [0.25, 8.0]]
    assert plain.tokens == [4, 5] and plain.chunk == 3
    assert set(f.name for f in embeddings_pb2.Embedding.DESCRIPTOR.fields) == {"values", "tokens", "packed"}


@pytest.mark.parametrize("ours, theirs", [(types.Pooling, embeddings_pb2.Pooling), (types.Encoding, embeddings_pb2.Encoding),
                                          (types.JobState, finetune_pb2.JobState)])
def test_enums_mirror_the_protos(ours: Any, theirs: Any) -> None:
    prefix = {"Pooling": "POOLING_", "Encoding": "ENCODING_", "JobState": "JOB_STATE_"}[ours.__name__]
    assert {m.name: m.value for m in ours} == {n.removeprefix(prefix): v for n, v in theirs.items()}


def test_the_generated_modules_are_current() -> None:
    spec = importlib.util.spec_from_file_location("generate_stubs", REPO / "clients/python/tools/generate_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.stale() == [], "run `make proto`"


def test_the_server_uses_the_client_packages_modules() -> None:
    import adaptgate.v1
    from adaptgate.v1 import embeddings_pb2 as server_side

    assert server_side is embeddings_pb2
    assert sys.modules["adaptgate.v1.finetune_pb2"] is finetune_pb2
    assert adaptgate_client.__version__
