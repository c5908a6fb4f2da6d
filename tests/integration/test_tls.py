"""TLS and mTLS (RELIABILITY 33): plaintext, a missing client certificate or one from another CA never
reaches a handler; a client certificate from the configured CA works."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from adaptgate.client import Client
from tests.integration.conftest import running_gateway

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates"),
]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", f"/CN={name}")
    return key, cert


def make_leaf(d: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return key, cert


def credentials(ca: Path, leaf: tuple[Path, Path] | None) -> grpc.ChannelCredentials:
    key, cert = (leaf[0].read_bytes(), leaf[1].read_bytes()) if leaf else (None, None)
    return grpc.ssl_channel_credentials(ca.read_bytes(), private_key=key, certificate_chain=cert)


def test_mtls_admits_only_clients_with_a_certificate_from_the_configured_ca(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    other_ca = make_ca(tmp_path, "other-ca")
    server = make_leaf(tmp_path, "server", ca, "IP:127.0.0.1,DNS:localhost")
    good_client = make_leaf(tmp_path, "client", ca, "DNS:client")
    rogue_client = make_leaf(tmp_path, "rogue", other_ca, "DNS:rogue")
    tls = ("--tls-cert-file", str(server[1]), "--tls-key-file", str(server[0]), "--tls-client-ca-file", str(ca[1]))
    with running_gateway(tmp_path / "data", *tls) as gateway:
        target = gateway.target
        ok = Client(target, "acme-token", timeout=20, credentials=credentials(ca[1], good_client))
        assert len(ok.embed(["over mutual TLS"]).embeddings) == 1
        refused = [
            Client(target, "acme-token", timeout=5),
            Client(target, "acme-token", timeout=5, credentials=credentials(ca[1], None)),
            Client(target, "acme-token", timeout=5, credentials=credentials(ca[1], rogue_client)),
        ]
        for client in refused:
            with pytest.raises(grpc.RpcError) as info:
                client.embed(["should never reach a handler"])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        body = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
        handled = [line for line in body.splitlines() if line.startswith("adaptgate_requests_total{")]
        assert handled == ['adaptgate_requests_total{code="OK",method="Embed"} 1.0']  # the refused never got here
