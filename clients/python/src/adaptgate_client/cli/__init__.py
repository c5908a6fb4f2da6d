"""`adaptgate-client embed | classify | datasets … | jobs … | adapters … | demo`.

Every field of every request has a flag here (tests/unit/test_client_cli.py walks the .proto messages to
hold it to that). The server's `adaptgate` command adds these same subcommands beside `serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "localhost:50051"

# Which RPCs each subcommand calls; every RPC of every service is somewhere here.
COMMAND_RPCS: dict[str, tuple[str, ...]] = {
    "embed": ("adaptgate.v1.Embeddings.Embed", "adaptgate.v1.Embeddings.EmbedStream"),
    "classify": ("adaptgate.v1.Classifier.Classify",),
    "adapters": tuple(f"adaptgate.v1.Adapters.{m}" for m in (
        "LoadAdapter", "UnloadAdapter", "ListAdapters", "GetAdapter", "UploadAdapter", "SetAlias", "DeleteAdapter")),
    "datasets": tuple(f"adaptgate.v1.Datasets.{m}" for m in ("UploadDataset", "GetDataset", "ListDatasets", "DeleteDataset")),
    "jobs": tuple(f"adaptgate.v1.Finetune.{m}" for m in ("SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob")),
}
# Request fields whose argument is not named after them: `message.field` -> argparse dest.
FIELD_DESTS = {
    "adaptgate.v1.UploadAdapterChunk.filename": "ref",  # the files of the directory given as `ref`
    "adaptgate.v1.UploadAdapterChunk.data": "ref",
    "adaptgate.v1.UploadDatasetChunk.data": "target",  # the file given as `target`
    "adaptgate.v1.DatasetRef.id": "target",
    "adaptgate.v1.JobRef.id": "job_id",
}
POOLINGS = ("unspecified", "mean", "cls", "last_token")
ENCODINGS = ("float", "bytes_f32")


def default_token() -> str:
    """ADAPTGATE_TOKEN, else the dev tenant's token from a local server's data directory."""
    if token := os.environ.get("ADAPTGATE_TOKEN"):
        return token
    path = Path(os.environ.get("ADAPTGATE_DATA_DIR", "data")) / "tokens.json"
    if path.exists():
        tokens = json.loads(path.read_text())["tokens"]
        return next((t for t, p in tokens.items() if not p.get("admin")), "")
    return ""


def _channel_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, int(value) if value.lstrip("-").isdigit() else value


def client_flags(parser: argparse.ArgumentParser) -> None:
    """Where the server is, who we are, TLS, deadline, retries and raw channel options."""
    env = os.environ.get
    parser.add_argument("--server", default=env("ADAPTGATE_SERVER", DEFAULT_SERVER), help="host:port of the gateway")
    parser.add_argument("--token", default=default_token(), help="bearer token (default: $ADAPTGATE_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, default=env("ADAPTGATE_TLS_CA") or None,
                        help="PEM CA bundle that signed the server's certificate; any --tls-* option turns TLS on (default: $ADAPTGATE_TLS_CA)")
    parser.add_argument("--tls-cert", type=Path, default=env("ADAPTGATE_TLS_CERT") or None,
                        help="PEM client certificate, for servers that require mTLS (default: $ADAPTGATE_TLS_CERT)")
    parser.add_argument("--tls-key", type=Path, default=env("ADAPTGATE_TLS_KEY") or None,
                        help="PEM private key of --tls-cert (default: $ADAPTGATE_TLS_KEY)")
    parser.add_argument("--tls-server-name", default=env("ADAPTGATE_TLS_SERVER_NAME", ""),
                        help="name to check the server's certificate against, when --server is an IP or a tunnel (default: $ADAPTGATE_TLS_SERVER_NAME)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds each call may take, retries included (streams and watches: no limit)")
    parser.add_argument("--max-attempts", type=int, default=5,
                        help="tries per call on RESOURCE_EXHAUSTED/UNAVAILABLE, waiting as the server's retry-after-ms says")
    parser.add_argument("--channel-option", type=_channel_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a gRPC channel argument, e.g. grpc.keepalive_time_ms=30000 (repeatable)")


def _command(sub: Any, name: str, help: str, func: str) -> argparse.ArgumentParser:  # noqa: A002
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(func=_handler(func), rpcs=COMMAND_RPCS.get(name, ()))
    return parser


def _handler(name: str) -> Any:
    def run(args: argparse.Namespace) -> None:
        from adaptgate_client.cli import commands

        getattr(commands, name)(args)

    return run


def _embed_parser(sub: Any) -> argparse.ArgumentParser:
    p = _command(sub, "embed", "embed texts, or stream a file of them into an .npy", "cmd_embed")
    p.add_argument("texts", nargs="*", help="texts to embed (or --input)")
    p.add_argument("--input", type=Path, help="a text per line (or .jsonl rows with a text field), streamed")
    p.add_argument("--output", type=Path, help="with --input: where the [texts, dim] float32 array goes (.npy, written as rows arrive)")
    p.add_argument("--chunk-size", type=int, default=256, help="with --input: texts per streamed request")
    p.add_argument("--input-field", default="text", help="with a .jsonl --input: the key holding the text")
    p.add_argument("--adapter", default="", help="tenant adapter (`tenant/name[@version|:alias]`) for tenant-tuned embeddings")
    p.add_argument("--pooling", choices=POOLINGS, default="unspecified",
                   help="how token states become one vector (default: the base model's own)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="unit-length vectors or not (default: the model's own choice)")
    p.add_argument("--truncate", action="store_true", help="cut over-long texts to the token limit instead of rejecting them")
    p.add_argument("--prompt-name", default=None,
                   help='a prompt of the model (e.g. "query", "passage") put before each text; "" for none '
                        "(default: the model's default prompt, if any)")
    p.add_argument("--encoding", choices=ENCODINGS, default="bytes_f32",
                   help="how vectors travel back: packed float32 bytes (default, cheaper) or repeated floats")
    return p


def _classify_parser(sub: Any) -> argparse.ArgumentParser:
    p = _command(sub, "classify", "classify texts with one adapter, or several on the same texts", "cmd_classify")
    p.add_argument("texts", nargs="+", help="texts to classify")
    p.add_argument("--adapter", default="", help="`tenant/name[@version|:alias]`, or `name` for your own tenant")
    p.add_argument("--adapters", action="extend", nargs="+", default=[], metavar="ADAPTER",
                   help="several adapters on the same texts instead of --adapter; answers per adapter, in this order")
    p.add_argument("--top-k", type=int, default=0, help="label scores per text (0: all)")
    p.add_argument("--truncate", action="store_true", help="cut over-long texts to the token limit instead of rejecting them")
    p.add_argument("--abstain-below", type=float, default=None,
                   help="answer the abstain label when the top score is below this (0-1; default: the adapter's own threshold, if any)")
    p.add_argument("--abstain-label", default="", help='the label of an abstained answer (default: the adapter\'s, else "out_of_scope")')
    return p


def _datasets_parser(sub: Any) -> argparse.ArgumentParser:
    p = _command(sub, "datasets", "upload, list, get or delete datasets", "cmd_datasets")
    p.add_argument("action", choices=["upload", "list", "get", "delete"])
    p.add_argument("target", nargs="?", help="upload: the file (.jsonl, .csv or .parquet, streamed in chunks); get/delete: the dataset id")
    p.add_argument("--name", default="", help="upload: the dataset's name (default: the file name)")
    p.add_argument("--format", default="", choices=["", "jsonl", "csv", "parquet"], help="upload: default from the file suffix")
    p.add_argument("--text-field", default="", help='upload: the column (jsonl key) holding the text (default "text")')
    p.add_argument("--label-field", default="", help='upload: the column (jsonl key) holding the label (default "label")')
    return p


def _jobs_parser(sub: Any) -> argparse.ArgumentParser:
    p = _command(sub, "jobs", "submit, watch, list, get or cancel finetuning jobs", "cmd_jobs")
    p.add_argument("action", choices=["submit", "watch", "list", "get", "cancel"])
    p.add_argument("job_id", nargs="?", help="watch/get/cancel: the job id")
    p.add_argument("--dataset-id", "--dataset", dest="dataset_id", default="", help="submit: the dataset to train on")
    p.add_argument("--adapter-name", default="", help="submit: the adapter the job publishes (a new version of it)")
    p.add_argument("--method", default="",
                   help="submit: what to train, e.g. head, lora or embed (default: the server's, auto, which picks by the data)")
    p.add_argument("--alias", default="", help="submit: move this alias to the new version on success")
    p.add_argument("--validation-fraction", type=float, default=0.0, help="submit: rows held out for validation (0: 0.1)")
    p.add_argument("--epochs", type=int, default=0, help="submit: passes over the training rows (0: the method's default)")
    p.add_argument("--learning-rate", type=float, default=0.0, help="submit: 0 = the method's default (head 0.05, lora 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="submit: random seed")
    p.add_argument("--lora-rank", type=int, default=0, help="submit, LoRA: adapter rank (0: 16)")
    p.add_argument("--batch-size", type=int, default=0, help="submit, LoRA: rows per step (0: 32)")
    p.add_argument("--max-tokens", type=int, default=0, help="submit, LoRA: longer texts are truncated for training (0: 64)")
    p.add_argument("--max-steps", type=int, default=0, help="submit, LoRA: stop after this many optimizer steps (0: by epochs)")
    p.add_argument("--max-seconds", type=int, default=0,
                   help="submit: wall-clock limit before the job fails (0: the server's max_job_seconds, which also caps it)")
    p.add_argument("--validation-dataset-id", default="",
                   help="submit: validate on this dataset of yours (labels a subset of the training set's) instead of a split")
    p.add_argument("--out-of-scope-label", default="",
                   help="submit, head: rows with this label are out of scope: never learnt, they set the adapter's abstain threshold")
    p.add_argument("--watch", action="store_true", help="after submit, follow the job until it ends")
    return p


def _adapters_parser(sub: Any) -> argparse.ArgumentParser:
    p = _command(sub, "adapters", "list, get, load, unload, alias, upload or delete adapters", "cmd_adapters")
    p.add_argument("action", choices=["list", "get", "load", "unload", "alias", "upload", "delete"])
    p.add_argument("ref", nargs="?", help="adapter reference `tenant/name[@version|:alias]`, or a directory (PEFT's files) for upload")
    p.add_argument("--alias", default="", help="alias: the alias to point at ref; upload: an alias for the new version")
    p.add_argument("--name", default="", help="upload: the adapter's name (default: the directory's)")
    p.add_argument("--pin", action="store_true", help="load: never evict it (until unload)")
    p.add_argument("--force", action="store_true", help="delete: also remove aliases pointing at the deleted versions")
    p.add_argument("--tenant", default="", help="list: another tenant's adapters (admins; default: yours, or all for an admin)")
    return p


def _demo_parser(sub: Any) -> argparse.ArgumentParser:
    p = _command(sub, "demo", "train a spam classifier on a running server and score it", "cmd_demo")
    p.add_argument("--data", default="examples/data/sms_spam", help="a directory with train.jsonl and test.jsonl")
    p.add_argument("--adapter-name", default="sms-spam")
    return p


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Adds the client subcommands to `sub` (an add_subparsers() result); returns their parsers."""
    parsers = [f(sub) for f in (_embed_parser, _classify_parser, _datasets_parser, _jobs_parser, _adapters_parser, _demo_parser)]
    for parser in parsers:
        client_flags(parser)
    return parsers


def build_parser(prog: str = "adaptgate-client") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run(args: argparse.Namespace) -> None:
    """Runs a parsed command; a gRPC failure ends the process with its status, not a traceback."""
    import grpc

    try:
        args.func(args)
    except grpc.RpcError as exc:
        sys.exit(f"error: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
