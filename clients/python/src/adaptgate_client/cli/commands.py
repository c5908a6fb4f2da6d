"""What each `adaptgate-client` subcommand does with its parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adaptgate_client.cli.progress import JobProgress
from adaptgate_client.client import Client
from adaptgate_client.npy import NpyRowWriter
from adaptgate_client.retry import RetryPolicy
from adaptgate_client.tls import ClientTls
from adaptgate_client.types import Adapter, Classification, Encoding, Job, JobEvent, Pooling


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """TLS when any --tls-* option (or ADAPTGATE_TLS_* variable) is given; plaintext otherwise."""
    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name or "")


def make_client(args: argparse.Namespace) -> Client:
    if not args.token:
        sys.exit("no token: pass --token, set ADAPTGATE_TOKEN, or run next to the server's data/tokens.json")
    try:
        return Client(args.server, args.token, tls=client_tls(args), timeout=args.timeout, options=args.channel_option,
                      retry_policy=RetryPolicy(max_attempts=args.max_attempts))
    except (ValueError, OSError) as exc:  # a cert without its key, an unreadable PEM file
        sys.exit(f"error: {exc}")


def _json(value: Any) -> str:
    return json.dumps(dataclasses.asdict(value), default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v))


def _embed_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"adapter": args.adapter, "pooling": Pooling[args.pooling.upper()], "normalize": args.normalize,
            "truncate": args.truncate, "encoding": Encoding[args.encoding.upper()], "prompt_name": args.prompt_name}


def read_texts(path: Path, field: str = "text") -> Iterator[str]:
    """One text per line, read lazily; a .jsonl file holds {"text": ...} objects (the dataset format)."""
    jsonl = path.suffix == ".jsonl"
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[field] if jsonl else line.rstrip("\r\n")


def chunked(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def embed_file(client: Client, source: Path, output: Path, chunk_size: int, field: str = "text", **options: Any) -> int:
    """Streams `source` through one EmbedStream call into `output`: texts are read as the server asks for them
    and rows are written as they arrive, so memory stays bounded whatever the file's size. Returns the rows."""
    if chunk_size < 1:
        raise SystemExit("--chunk-size must be at least 1")
    progress = sys.stderr.isatty()
    with NpyRowWriter(output) as out:
        for result in client.embed_stream(chunked(read_texts(source, field), chunk_size), **options):
            out.append(result.vectors)
            if progress:
                print(f"\rembedded {out.rows} texts", end="", file=sys.stderr, flush=True)
    end_of_progress = "\n" if progress else ""
    print(f"{end_of_progress}{out.rows} embeddings written to {output}", file=sys.stderr)
    return out.rows


def cmd_embed(args: argparse.Namespace) -> None:
    if args.input is not None:
        if args.output is None:
            sys.exit("embed --input needs --output FILE.npy")
        embed_file(make_client(args), args.input, args.output, args.chunk_size, args.input_field, **_embed_options(args))
        return
    if not args.texts:
        sys.exit("give texts to embed, or --input FILE --output FILE.npy")
    result = make_client(args).embed(args.texts, **_embed_options(args))
    for text, vector, tokens in zip(args.texts, result.vectors, result.tokens):
        print(json.dumps({"text": text, "tokens": tokens, "dim": len(vector), "values": [round(float(v), 6) for v in vector]}))


def _classification(result: Classification) -> dict[str, Any]:
    answer = {"label": result.label, "score": round(result.score, 4), "scores": {s.label: round(s.score, 4) for s in result.scores}}
    return answer | ({"abstained": True} if result.abstained else {})


def cmd_classify(args: argparse.Namespace) -> None:
    if bool(args.adapter) == bool(args.adapters):
        sys.exit("classify needs --adapter, or --adapters for several")
    response = make_client(args).classify(args.texts, args.adapter, adapters=args.adapters, top_k=args.top_k,
                                          truncate=args.truncate, abstain_below=args.abstain_below,
                                          abstain_label=args.abstain_label)
    for i, text in enumerate(args.texts):
        if args.adapter:
            print(json.dumps({"text": text, "adapter": response.adapter, **_classification(response.results[i])}))
        else:
            by = {a.adapter: _classification(a.results[i]) for a in response.by_adapter}
            print(json.dumps({"text": text, "by_adapter": by}))


def cmd_datasets(args: argparse.Namespace) -> None:
    client = make_client(args)
    if args.action == "list":
        for ds in client.list_datasets():
            print(f"{ds.id}  {ds.name:24} rows={ds.rows} labels={len(ds.labels)}")
        return
    if not args.target:
        sys.exit(f"datasets {args.action} needs {'a file' if args.action == 'upload' else 'a dataset id'}")
    if args.action == "upload":
        print(_json(client.upload_dataset(Path(args.target), name=args.name, format=args.format,
                                          text_field=args.text_field, label_field=args.label_field)))
    elif args.action == "get":
        print(_json(client.get_dataset(args.target)))
    else:
        deleted = client.delete_dataset(args.target)
        print(f"deleted {deleted.id}  {deleted.name}")


def print_adapter(adapter: Adapter) -> None:
    aliases = ",".join(adapter.aliases) or "-"
    state = "pinned" if adapter.pinned else "loaded" if adapter.loaded else "on disk"
    print(f"{adapter.ref:32} aliases={aliases:10} rank={adapter.rank:<3} labels={len(adapter.labels):<3} {state}  {adapter.source}")


def cmd_adapters(args: argparse.Namespace) -> None:
    client = make_client(args)
    if args.action == "list":
        for adapter in client.list_adapters(args.tenant):
            print_adapter(adapter)
        return
    if not args.ref:
        sys.exit(f"adapters {args.action} needs an adapter reference (or a directory for upload)")
    if args.action == "upload":
        directory = Path(args.ref)
        print_adapter(client.upload_adapter(directory, args.name or directory.name.lower(), alias=args.alias))
    elif args.action == "delete":
        deleted = client.delete_adapter(args.ref, force=args.force)
        removed = f" (aliases removed: {', '.join(deleted.aliases_removed)})" if deleted.aliases_removed else ""
        print(f"deleted {', '.join(deleted.deleted)}{removed}")
    elif args.action == "alias":
        if not args.alias:
            sys.exit("adapters alias needs --alias")
        print_adapter(client.set_alias(args.ref, args.alias))
    elif args.action == "load":
        print_adapter(client.load_adapter(args.ref, pin=args.pin))
    else:
        print_adapter(client.unload_adapter(args.ref) if args.action == "unload" else client.get_adapter(args.ref))


def print_job(job: Job) -> None:
    print(f"{job.id}  {job.state.name:9} {job.method:5} {job.adapter_name:20} "
          f"progress={job.progress:.0%} acc={job.metrics.accuracy:.4f} {job.adapter or job.error}")


def watch(client: Client, job_id: str) -> JobEvent | None:
    """Follows a job to its terminal state on stderr (progress.py: a redrawn line on a terminal, a line
    every few seconds elsewhere); returns the last event."""
    last = None
    progress = JobProgress(sys.stderr)
    try:
        for event in client.watch_job(job_id):
            progress.update(event)
            last = event
    finally:
        progress.close()
    return last


def cmd_jobs(args: argparse.Namespace) -> None:
    client = make_client(args)
    if args.action == "submit":
        if not args.dataset_id or not args.adapter_name:
            sys.exit("jobs submit needs --dataset-id and --adapter-name")
        job = client.submit_job(
            args.dataset_id, args.adapter_name, method=args.method, alias=args.alias,
            validation_fraction=args.validation_fraction, epochs=args.epochs, learning_rate=args.learning_rate,
            seed=args.seed, lora_rank=args.lora_rank, batch_size=args.batch_size, max_tokens=args.max_tokens,
            max_steps=args.max_steps, max_seconds=args.max_seconds, validation_dataset_id=args.validation_dataset_id,
            out_of_scope_label=args.out_of_scope_label)
        print_job(job)
        if args.watch:
            watch(client, job.id)
            print_job(client.get_job(job.id))
        return
    if args.action == "list":
        for job in client.list_jobs():
            print_job(job)
        return
    if not args.job_id:
        sys.exit(f"jobs {args.action} needs a job id")
    if args.action == "watch":
        watch(client, args.job_id)
    print_job(client.cancel_job(args.job_id) if args.action == "cancel" else client.get_job(args.job_id))


def cmd_demo(args: argparse.Namespace) -> None:
    from adaptgate_client.cli.demo import run_demo

    run_demo(make_client(args), Path(args.data), args.adapter_name)
