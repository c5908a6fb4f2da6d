"""`adaptgate serve | embed | classify | datasets … | jobs … | adapters … | demo`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from adaptgate.settings import Settings

DEFAULT_SERVER = "localhost:50051"


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, so flags and ADAPTGATE_* env vars never drift apart."""
    for name, field in Settings.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None, help=field.description)


def _settings(args: argparse.Namespace) -> Settings:
    """The serve settings, or an exit with one line per problem (a partial TLS setup, a bad value)."""
    from pydantic import ValidationError

    overrides = {k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        sys.exit("adaptgate serve: the settings are not valid:\n  " + "\n  ".join(problems))


def _default_token() -> str:
    """ADAPTGATE_TOKEN, else the dev tenant's token from a local server's data directory."""
    if token := os.environ.get("ADAPTGATE_TOKEN"):
        return token
    path = Path(os.environ.get("ADAPTGATE_DATA_DIR", "data")) / "tokens.json"
    if path.exists():
        tokens = json.loads(path.read_text())["tokens"]
        return next((t for t, p in tokens.items() if not p.get("admin")), "")
    return ""


def _client(args: argparse.Namespace) -> Any:
    from adaptgate.client import Client

    if not args.token:
        sys.exit("no token: pass --token, set ADAPTGATE_TOKEN, or run next to the server's data/tokens.json")
    try:
        return Client(args.server, args.token, tls=_client_tls(args))
    except (ValueError, OSError) as exc:  # a cert without its key, an unreadable PEM file
        sys.exit(f"error: {exc}")


def _client_tls(args: argparse.Namespace) -> Any:
    """TLS when any --tls-* option (or ADAPTGATE_TLS_* variable) is given; plaintext otherwise."""
    from adaptgate.client import ClientTls

    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name or "")


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from adaptgate.server import configure_logging, serve

    settings = _settings(args)
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))


def cmd_embed(args: argparse.Namespace) -> None:
    if args.input is not None:
        from adaptgate.commands.embed import embed_file

        if args.output is None:
            sys.exit("embed --input needs --output FILE.npy")
        embed_file(_client(args), args.input, args.output, args.chunk_size, args.adapter, args.truncate)
        return
    if not args.texts:
        sys.exit("give texts to embed, or --input FILE --output FILE.npy")
    response = _client(args).embed(args.texts, adapter=args.adapter, truncate=args.truncate)
    for text, emb in zip(args.texts, response.embeddings):
        print(json.dumps({"text": text, "tokens": emb.tokens, "dim": len(emb.values), "values": [round(v, 6) for v in emb.values]}))


def cmd_classify(args: argparse.Namespace) -> None:
    response = _client(args).classify(args.texts, args.adapter, top_k=args.top_k, truncate=args.truncate)
    for text, result in zip(args.texts, response.results):
        scores = {s.label: round(s.score, 4) for s in result.scores}
        print(json.dumps({"text": text, "label": result.label, "score": round(result.score, 4), "scores": scores}))


def cmd_datasets(args: argparse.Namespace) -> None:
    from google.protobuf.json_format import MessageToDict

    from adaptgate.v1 import datasets_pb2

    client = _client(args)
    if args.action == "upload":
        result = client.upload_dataset(Path(args.path), name=args.name, fmt=args.format)
        print(json.dumps(MessageToDict(result), indent=2))
    elif args.action == "delete":
        if not args.path:
            sys.exit("datasets delete needs a dataset id")
        deleted = client.delete_dataset(args.path)
        print(f"deleted {deleted.id}  {deleted.name}")
    else:
        response = client.datasets.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=client.metadata)
        for ds in response.datasets:
            print(f"{ds.id}  {ds.name:24} rows={ds.rows} labels={len(ds.labels)}")


def cmd_jobs(args: argparse.Namespace) -> None:
    from adaptgate.commands.jobs import run_jobs_command

    run_jobs_command(_client(args), args)


def cmd_adapters(args: argparse.Namespace) -> None:
    from adaptgate.commands.adapters import run_adapters_command

    run_adapters_command(_client(args), args)


def cmd_demo(args: argparse.Namespace) -> None:
    from adaptgate.commands.demo import run_demo

    run_demo(_client(args), Path(args.data), args.adapter_name)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("ADAPTGATE_SERVER", DEFAULT_SERVER), help="host:port of the gateway")
    parser.add_argument("--token", default=_default_token(), help="bearer token (default: $ADAPTGATE_TOKEN)")
    env = os.environ.get
    parser.add_argument("--tls-ca", type=Path, default=env("ADAPTGATE_TLS_CA") or None,
                        help="PEM CA bundle that signed the server's certificate; any --tls-* option turns TLS on (default: $ADAPTGATE_TLS_CA)")
    parser.add_argument("--tls-cert", type=Path, default=env("ADAPTGATE_TLS_CERT") or None,
                        help="PEM client certificate, for servers that require mTLS (default: $ADAPTGATE_TLS_CERT)")
    parser.add_argument("--tls-key", type=Path, default=env("ADAPTGATE_TLS_KEY") or None,
                        help="PEM private key of --tls-cert (default: $ADAPTGATE_TLS_KEY)")
    parser.add_argument("--tls-server-name", default=env("ADAPTGATE_TLS_SERVER_NAME", ""),
                        help="name to check the server's certificate against, when --server is an IP or a tunnel (default: $ADAPTGATE_TLS_SERVER_NAME)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (gRPC + /metrics, local Ray)")
    _settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    embed = sub.add_parser("embed", help="embed texts, or stream a file of them into an .npy")
    embed.add_argument("texts", nargs="*")
    embed.add_argument("--input", type=Path, help="a text per line (or .jsonl rows with a text field), streamed")
    embed.add_argument("--output", type=Path, help="with --input: where the [texts, dim] float32 array goes")
    embed.add_argument("--chunk-size", type=int, default=256, help="with --input: texts per streamed request")
    embed.add_argument("--adapter", default="")
    embed.add_argument("--truncate", action="store_true")
    embed.set_defaults(func=cmd_embed)

    classify = sub.add_parser("classify", help="classify texts with an adapter")
    classify.add_argument("texts", nargs="+")
    classify.add_argument("--adapter", required=True)
    classify.add_argument("--top-k", type=int, default=0)
    classify.add_argument("--truncate", action="store_true")
    classify.set_defaults(func=cmd_classify)

    datasets = sub.add_parser("datasets", help="upload, list or delete datasets")
    datasets.add_argument("action", choices=["upload", "list", "delete"])
    datasets.add_argument("path", nargs="?", help="a file for upload, a dataset id for delete")
    datasets.add_argument("--name", default="")
    datasets.add_argument("--format", default="", choices=["", "jsonl", "csv"])
    datasets.set_defaults(func=cmd_datasets)

    jobs = sub.add_parser("jobs", help="submit, watch, list, get or cancel finetuning jobs")
    jobs.add_argument("action", choices=["submit", "watch", "list", "get", "cancel"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--dataset", default="")
    jobs.add_argument("--adapter-name", default="")
    jobs.add_argument("--method", default="head", choices=["head", "lora", "embed", "auto"])
    jobs.add_argument("--alias", default="")
    jobs.add_argument("--watch", action="store_true", help="after submit, follow the job with a progress bar")
    jobs.set_defaults(func=cmd_jobs)

    adapters = sub.add_parser("adapters", help="list, get, load, unload, alias, upload or delete adapters")
    adapters.add_argument("action", choices=["list", "get", "load", "unload", "alias", "upload", "delete"])
    adapters.add_argument("ref", nargs="?", help="adapter reference, or a directory for upload")
    adapters.add_argument("--alias", default="")
    adapters.add_argument("--name", default="", help="adapter name for upload")
    adapters.add_argument("--pin", action="store_true", help="with load: never evict it")
    adapters.add_argument("--force", action="store_true", help="with delete: also remove aliases pointing at it")
    adapters.set_defaults(func=cmd_adapters)

    demo = sub.add_parser("demo", help="train a spam classifier on a running server and score it")
    demo.add_argument("--data", default="examples/data/sms_spam")
    demo.add_argument("--adapter-name", default="sms-spam")
    demo.set_defaults(func=cmd_demo)

    for p in (embed, classify, datasets, jobs, adapters, demo):
        _client_flags(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    # Before gRPC loads: its fork handlers can hang a child forked while RPCs are in flight, as Ray's
    # ray.init does when the first job starts a local Ray. We only ever fork to exec, the case gRPC
    # documents this setting for (doc/fork_support.md).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    import grpc

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except grpc.RpcError as exc:
        sys.exit(f"error: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
