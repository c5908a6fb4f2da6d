"""TLS towards the gateway, shared by Client, AsyncClient and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientTls:
    """TLS towards the gateway: the CA that signed its certificate (None: the system's roots), the
    client certificate and key for mTLS (both or neither), and the name the server certificate is
    checked against when it differs from the host in the target (an IP, a port-forward, a tunnel)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert", "key") if self.key_file is None else ("key", "cert")
            raise ValueError(
                f"a client TLS {given} was given without its {missing} (--tls-{missing}, ADAPTGATE_TLS_{missing.upper()}); "
                "mTLS needs both, plain TLS neither"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


# Embedding responses of a few hundred long vectors exceed gRPC's 4 MiB default.
DEFAULT_OPTIONS: tuple[tuple[str, object], ...] = (("grpc.max_receive_message_length", 64 << 20),)


def channel_setup(
    tls: ClientTls | None, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, object]] | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, object]]]:
    """Credentials (None: plaintext) and channel options: ours first, so the caller's win where they repeat."""
    merged: list[tuple[str, object]] = [*DEFAULT_OPTIONS]
    if tls is not None:
        if credentials is not None:
            raise ValueError("give the client either tls or credentials, not both")
        credentials = tls.credentials()
        merged += tls.options()
    return credentials, merged + list(options or [])
