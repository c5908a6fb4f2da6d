"""Shared fixtures: a tiny randomly initialised BERT that uses the packaged tokenizer (fast, offline)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when imported (peft imports it): kernels then run on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import BertConfig, BertModel  # noqa: E402

from adaptgate.engine.model import packaged_model_dir  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_tiny_bert(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_model_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def other_tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different weights: adapters made for it must be refused by the first."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-other"), seed=1)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (tests/postgres.py); skipped only where none is installed."""
    from tests.postgres import NOT_INSTALLED, PostgresServer, binaries

    bindir = binaries()
    if bindir is None:
        pytest.skip(NOT_INSTALLED)
    server = PostgresServer(bindir)
    try:
        yield server.start().url
    finally:
        server.stop()


@pytest.fixture
def pg_database_url(postgres_url: str) -> str:
    """A fresh, empty database on the session's server: tests never see each other's rows."""
    from tests.postgres import create_database

    return create_database(postgres_url)
