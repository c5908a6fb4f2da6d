"""Request messages and upload chunks, shared by Client and AsyncClient (and so built one way only)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from adaptgate_client.types import Encoding, Pooling
from adaptgate_client.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

CHUNK_BYTES = 1 << 20
# What PEFT's save_pretrained writes that the gateway needs (plus our labels.json); README.md and the like stay home.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "labels.json", "adaptgate.json")


def embed(
    texts: Sequence[str], adapter: str, pooling: Pooling | int, normalize: bool | None, truncate: bool,
    encoding: Encoding | int, prompt_name: str | None = None,
) -> embeddings_pb2.EmbedRequest:
    request = embeddings_pb2.EmbedRequest(
        texts=list(texts), adapter=adapter, pooling=int(pooling), truncate=truncate, encoding=int(encoding)
    )
    if normalize is not None:  # unset means the model's own choice, which differs from False
        request.normalize = normalize
    if prompt_name is not None:  # unset means the model's default prompt; "" means none
        request.prompt_name = prompt_name
    return request


def classify(
    texts: Sequence[str], adapter: str, adapters: Sequence[str], top_k: int, truncate: bool,
    abstain_below: float | None = None, abstain_label: str = "",
) -> classifier_pb2.ClassifyRequest:
    if adapter and adapters:
        raise ValueError("give classify either adapter or adapters, not both")
    return classifier_pb2.ClassifyRequest(texts=list(texts), adapter=adapter, adapters=list(adapters), top_k=top_k,
                                          truncate=truncate, abstain_below=abstain_below, abstain_label=abstain_label)


def dataset_chunks(
    path: Path, name: str, format: str, text_field: str, label_field: str  # noqa: A002 - the proto's field name
) -> Iterator[datasets_pb2.UploadDatasetChunk]:
    """Reads a chunk at a time, so a dataset of any size uploads in bounded memory (and a retry rereads the
    file). A missing file fails here, in the caller's thread, not inside gRPC's sending thread."""
    path = Path(path)
    path.stat()
    format = format or {".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower(), "jsonl")  # noqa: A001
    first = datasets_pb2.UploadDatasetChunk(name=name or path.stem, format=format, text_field=text_field,
                                           label_field=label_field)
    return _dataset_chunks(path, first)


def _dataset_chunks(path: Path, first: datasets_pb2.UploadDatasetChunk) -> Iterator[datasets_pb2.UploadDatasetChunk]:
    with path.open("rb") as f:
        first.data = f.read(CHUNK_BYTES)
        yield first
        while data := f.read(CHUNK_BYTES):
            yield datasets_pb2.UploadDatasetChunk(data=data)


def adapter_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (an adapter upload sends the files PEFT saved in one)")
    return [p for p in sorted(directory.iterdir()) if p.name in ADAPTER_FILES or p.suffix in (".bin", ".pt")]


def adapter_chunks(directory: Path, name: str, alias: str) -> Iterator[adapters_pb2.UploadAdapterChunk]:
    """The first chunk names the adapter, then each file goes in chunks (an empty file in one empty chunk)."""
    return _adapter_chunks(adapter_files(directory), name, alias)


def _adapter_chunks(files: list[Path], name: str, alias: str) -> Iterator[adapters_pb2.UploadAdapterChunk]:
    yield adapters_pb2.UploadAdapterChunk(name=name, alias=alias)
    for path in files:
        with path.open("rb") as f:
            data = f.read(CHUNK_BYTES)
            yield adapters_pb2.UploadAdapterChunk(filename=path.name, data=data)
            while data := f.read(CHUNK_BYTES):
                yield adapters_pb2.UploadAdapterChunk(filename=path.name, data=data)


def submit_job(dataset_id: str, adapter_name: str, **options: object) -> finetune_pb2.SubmitJobRequest:
    return finetune_pb2.SubmitJobRequest(dataset_id=dataset_id, adapter_name=adapter_name, **options)  # type: ignore[arg-type]


def embed_chunks(
    chunks: Iterable[Sequence[str]], template: embeddings_pb2.EmbedRequest
) -> Iterator[embeddings_pb2.EmbedRequest]:
    """Each chunk's request is the template (adapter, pooling, ...) with its texts."""
    for chunk in chunks:
        request = embeddings_pb2.EmbedRequest()
        request.CopyFrom(template)
        request.texts.extend(chunk)
        yield request
