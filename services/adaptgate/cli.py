"""`adaptgate serve | embed | classify | datasets … | jobs … | adapters … | demo`.

`serve` is the gateway; the other subcommands are the client package's (`adaptgate-client`, adaptgate_client.cli),
added here as they are so that one command does both.
"""

from __future__ import annotations

import argparse
import os
import sys

from adaptgate.settings import Settings


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


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from adaptgate.server import configure_logging, serve

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: the client package loads gRPC, which main() must configure first.
    from adaptgate_client.cli import add_commands

    parser = argparse.ArgumentParser(prog="adaptgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (gRPC + /metrics, local Ray)")
    _settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    add_commands(sub)  # embed, classify, datasets, jobs, adapters, demo: the client package's CLI
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
