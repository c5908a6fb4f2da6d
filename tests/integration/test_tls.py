"""TLS and mTLS (RELIABILITY 33): plaintext, a missing client certificate or one from another CA never
reaches a handler; a client certificate from the configured CA works."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from adaptgate.client import Client
from tests.integration.conftest import REPO, running_gateway

TOKEN = {"Authorization": "Bearer acme-token"}

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
        https = gateway.http_url.replace("http://", "https://")
        assert_https_is_mutual(https, ca, good_client, rogue_client)
        body = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
        handled = [line for line in body.splitlines() if line.startswith("adaptgate_requests_total{")]
        assert handled == [  # the refused never got here
            'adaptgate_requests_total{code="OK",method="Embed",protocol="grpc"} 1.0',
            'adaptgate_requests_total{code="OK",method="ListModels",protocol="http"} 1.0',
        ]


def assert_https_is_mutual(https: str, ca: tuple[Path, Path], good: tuple[Path, Path], rogue: tuple[Path, Path]) -> None:
    """The HTTP API serves the same TLS: plaintext and clients without a certificate from the CA are refused."""
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(https.replace("https://", "http://") + "/v1/models", timeout=10)
    for leaf in (None, rogue):
        context = ssl.create_default_context(cafile=str(ca[1]))
        if leaf is not None:
            context.load_cert_chain(str(leaf[1]), str(leaf[0]))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(urllib.request.Request(f"{https}/v1/models", headers=TOKEN), timeout=10, context=context).read()
    context = ssl.create_default_context(cafile=str(ca[1]))
    context.load_cert_chain(str(good[1]), str(good[0]))
    with urllib.request.urlopen(urllib.request.Request(f"{https}/v1/models", headers=TOKEN), timeout=10, context=context) as ok:
        assert ok.status == 200


PARTIAL_TLS = [
    (("--tls-cert-file",), "tls_key_file"),
    (("--tls-key-file",), "tls_cert_file"),
    (("--tls-client-ca-file",), "tls_cert_file"),
    (("--tls-cert-file", "--tls-client-ca-file"), "tls_key_file"),
]


@pytest.mark.parametrize(("flags", "missing"), PARTIAL_TLS)
def test_a_partial_tls_configuration_refuses_to_start(tmp_path: Path, flags: tuple[str, ...], missing: str) -> None:
    """Never plaintext by accident: `serve` exits at once with a sentence naming the missing setting."""
    pem = tmp_path / "any.pem"
    pem.write_text("not read: the configuration is refused before any file is opened\n")
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tokens": {"acme-token": {"tenant": "acme"}}}')
    cmd = [
        sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-port", "-1",
        "--data-dir", str(tmp_path / "data"), "--tokens-file", str(tokens),
    ]
    for flag in flags:
        cmd += [flag, str(pem)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTGATE_")}
    try:
        done = subprocess.run(cmd, cwd=REPO, env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve kept running with {flags} alone: {(exc.stdout or b'')[-300:]!r}")
    assert done.returncode != 0
    assert "listening" not in done.stdout, "no port was opened"
    assert missing in done.stderr and f"ADAPTGATE_{missing.upper()}" in done.stderr, done.stderr[-1000:]
    assert "Traceback" not in done.stderr, "a clear sentence, not a stack trace"
    assert not (tmp_path / "data").exists(), "refused before anything was created"


def test_client_and_cli_reach_a_tls_server_with_tls_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Client(tls=...) and every client subcommand's --tls-* flags (or ADAPTGATE_TLS_* env vars) speak
    mTLS, and --tls-server-name is the name the server certificate is checked against."""
    from adaptgate import cli
    from adaptgate.client import ClientTls

    ca = make_ca(tmp_path, "ca")
    server = make_leaf(tmp_path, "server", ca, "DNS:adaptgate.internal")  # not 127.0.0.1: the override is needed
    client = make_leaf(tmp_path, "client", ca, "DNS:client")
    tls = ("--tls-cert-file", str(server[1]), "--tls-key-file", str(server[0]), "--tls-client-ca-file", str(ca[1]))
    with running_gateway(tmp_path / "data", *tls) as gateway:
        options = ClientTls(ca_file=ca[1], cert_file=client[1], key_file=client[0], server_name="adaptgate.internal")
        assert len(Client(gateway.target, "acme-token", timeout=20, tls=options).embed(["over mTLS"]).embeddings) == 1
        wrong_name = ClientTls(ca_file=ca[1], cert_file=client[1], key_file=client[0], server_name="other.internal")
        with pytest.raises(grpc.RpcError) as info:
            Client(gateway.target, "acme-token", timeout=5, tls=wrong_name).embed(["wrong name"])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        flags = ["--server", gateway.target, "--token", "acme-token", "--tls-ca", str(ca[1]), "--tls-cert", str(client[1]),
                 "--tls-key", str(client[0]), "--tls-server-name", "adaptgate.internal"]
        cli.main(["embed", *flags, "hello over mTLS"])
        assert json.loads(capsys.readouterr().out)["text"] == "hello over mTLS"
        cli.main(["adapters", "list", *flags])
        assert capsys.readouterr().out == ""  # acme has no adapters yet: an empty listing, not an error

        for var, value in (("ADAPTGATE_TLS_CA", ca[1]), ("ADAPTGATE_TLS_CERT", client[1]), ("ADAPTGATE_TLS_KEY", client[0]),
                           ("ADAPTGATE_TLS_SERVER_NAME", "adaptgate.internal")):
            monkeypatch.setenv(var, str(value))
        cli.main(["datasets", "list", "--server", gateway.target, "--token", "acme-token"])
        assert capsys.readouterr().out == ""
        cli.main(["jobs", "list", "--server", gateway.target, "--token", "acme-token"])
        assert capsys.readouterr().out == ""
        monkeypatch.delenv("ADAPTGATE_TLS_KEY")
        with pytest.raises(SystemExit) as refused:  # a client certificate without its key is refused, not ignored
            cli.main(["jobs", "list", "--server", gateway.target, "--token", "acme-token"])
        assert "--tls-key" in str(refused.value)
