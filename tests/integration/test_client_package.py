"""The client package on its own: a fresh virtualenv with `pip install ./clients/python` and nothing else (no
torch, no gateway code), whose `adaptgate-client` CLI embeds (texts, and a file streamed into an .npy) and
classifies against a real gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from adaptgate.client import Client
from adaptgate.engine.model import packaged_model_dir
from tests.integration.conftest import REPO, Gateway
from tests.unit.peft_adapters import make_peft_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ALLOWED = {"adaptgate-client", "grpcio", "protobuf", "numpy", "typing-extensions"}  # grpcio brings typing-extensions


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # A copy of the package, so the build writes nothing into the checkout (build/, *.egg-info).
    source = shutil.copytree(REPO / "clients" / "python", venv / "src-copy",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    yield venv


def cli(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAPTGATE_", "PYTHONPATH"))}
    done = subprocess.run([str(venv / "bin" / "adaptgate-client"), *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=venv)
    assert done.returncode == 0, f"adaptgate-client {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def test_the_venv_holds_the_client_and_its_three_dependencies_only(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)} - {"pip", "setuptools"}
    assert names <= ALLOWED, names - ALLOWED
    probe = "import importlib.util as u; print([m for m in ('adaptgate', 'torch', 'tqdm') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=client_venv).stdout.strip() == "[]"


def test_the_client_cli_embeds_and_classifies_against_a_real_gateway(
    client_venv: Path, gateway: Gateway, tmp_path: Path
) -> None:
    server = ["--server", gateway.target, "--token", "acme-token"]
    lines = cli(client_venv, "embed", "hello there", "general kenobi", *server).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    expected = Client(gateway.target, "acme-token").embed_array(["hello there", "general kenobi"])
    assert [r["text"] for r in rows] == ["hello there", "general kenobi"]
    np.testing.assert_allclose(np.array([r["values"] for r in rows]), expected, atol=1e-4)

    texts = [f"message number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(130)]
    source, output = tmp_path / "texts.txt", tmp_path / "vectors.npy"
    source.write_text("\n".join(texts) + "\n")
    cli(client_venv, "embed", "--input", str(source), "--output", str(output), "--chunk-size", "16", *server)
    vectors = np.load(output)
    assert vectors.shape == (130, expected.shape[1]) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[[0, 77, 129]], Client(gateway.target, "acme-token").embed_array(
        [texts[0], texts[77], texts[129]]), atol=1e-2)

    adapter_dir = tmp_path / "adapter"
    make_peft_adapter(packaged_model_dir(), adapter_dir, num_labels=3, rank=4, seed=3)
    uploaded = cli(client_venv, "adapters", "upload", str(adapter_dir), "--name", "cli-topics", "--alias", "prod", *server)
    assert "acme/cli-topics@v1" in uploaded.stdout
    answers = [json.loads(line) for line in cli(
        client_venv, "classify", "first text", "second text", "--adapter", "cli-topics:prod", "--top-k", "2", *server
    ).stdout.splitlines()]
    served = Client(gateway.target, "acme-token").classify(["first text", "second text"], "cli-topics:prod", top_k=2)
    assert [a["adapter"] for a in answers] == ["acme/cli-topics@v1"] * 2
    assert [a["label"] for a in answers] == [r.label for r in served.results]
    assert all(len(a["scores"]) == 2 for a in answers)
