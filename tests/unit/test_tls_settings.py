"""TLS fails closed (RELIABILITY 33): a partial TLS configuration is refused when the settings are
read, with a sentence that names what is missing, and the server never binds a plaintext port for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from adaptgate.server import _bind
from adaptgate.settings import Settings

CERT, KEY, CA = Path("/etc/tls/tls.crt"), Path("/etc/tls/tls.key"), Path("/etc/tls/ca.crt")
# (the files given, the settings each refusal must name as missing)
PARTIAL = [
    ({"tls_cert_file": CERT}, ["tls_key_file"]),
    ({"tls_key_file": KEY}, ["tls_cert_file"]),
    ({"tls_client_ca_file": CA}, ["tls_cert_file", "tls_key_file"]),
    ({"tls_cert_file": CERT, "tls_client_ca_file": CA}, ["tls_key_file"]),
    ({"tls_key_file": KEY, "tls_client_ca_file": CA}, ["tls_cert_file"]),
]


@pytest.mark.parametrize(("given", "missing"), PARTIAL)
def test_partial_tls_configuration_is_refused_naming_what_is_missing(given: dict[str, Path], missing: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**given)
    message = str(info.value)
    for name in missing:
        assert name in message and f"ADAPTGATE_{name.upper()}" in message, message
    assert "plaintext" in message, "the sentence says what would have happened and how to fix it"
    files = {"tls_cert_file": CERT, "tls_key_file": KEY, "tls_client_ca_file": CA}
    completed = Settings(**given, **{name: files[name] for name in missing})  # exactly what was named fixes it
    assert completed.tls_cert_file == CERT and completed.tls_key_file == KEY


def test_partial_tls_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTGATE_TLS_CLIENT_CA_FILE", str(CA))
    with pytest.raises(ValidationError, match="tls_cert_file"):
        Settings()


@pytest.mark.parametrize(("given", "missing"), PARTIAL)
def test_bind_never_serves_plaintext_for_a_partial_configuration(given: dict[str, Path], missing: list[str]) -> None:
    """Settings built without validation (model_construct) still never get a plaintext port."""

    async def bind() -> None:
        server = grpc.aio.server()
        settings = Settings.model_construct(**{**Settings().model_dump(), "host": "127.0.0.1", "port": 0, **given})
        try:
            with pytest.raises(ValueError, match=missing[0]):
                _bind(server, settings)
        finally:
            await server.stop(None)

    asyncio.run(bind())
