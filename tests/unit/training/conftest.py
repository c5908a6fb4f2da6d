"""Fixtures for training tests: a tiny random BERT (packaged tokenizer) and small datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from adaptgate.engine.model import packaged_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_bert(directory: Path) -> Path:
    """Hidden 32, 2 layers, the real 30522-token vocabulary: loads in well under a second."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_model_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("training-tiny-bert"))


def separable_rows(per_class: int = 30) -> list[dict[str, str]]:
    """Two classes with disjoint vocabularies: any sane encoder plus a linear head separates them."""
    animals = ["cat", "dog", "horse", "rabbit", "lion", "tiger", "zebra", "mouse"]
    money = ["price", "stock", "market", "bank", "loan", "invoice", "budget", "tax"]
    rows = []
    for i in range(per_class):
        rows.append({"text": f"the {animals[i % 8]} and the {animals[(i * 3 + 1) % 8]} sleep {i}", "label": "animal"})
        rows.append({"text": f"{money[i % 8]} {money[(i * 5 + 2) % 8]} report {i}", "label": "money"})
    return rows


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
