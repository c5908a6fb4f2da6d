"""Every client subcommand of `adaptgate` takes the TLS options (RELIABILITY 33): one forgotten
subcommand would leave its users with plaintext only."""

from __future__ import annotations

import argparse

from adaptgate.cli import build_parser

TLS_FLAGS = {"--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    return dict(choices)


def test_every_client_subcommand_takes_the_tls_options() -> None:
    commands = subcommands(build_parser())
    clients = {name: p for name, p in commands.items() if "--server" in p._option_string_actions}  # noqa: SLF001
    assert set(commands) - set(clients) == {"serve"}, "every subcommand but serve talks to a server"
    for name, parser in clients.items():
        missing = TLS_FLAGS - set(parser._option_string_actions)  # noqa: SLF001
        assert not missing, f"adaptgate {name} lacks {sorted(missing)}"
