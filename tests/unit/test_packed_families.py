"""The packed-encoder registry: a registered family runs padding-free with its transformers forward's answers,
and any other family says at start that it runs its padded transformers forward."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

from adaptgate.engine import forward as forward_module
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import load_base_model, packaged_model_dir
from adaptgate.engine.packed import PACKED_ENCODERS, Packing, encoder_path
from adaptgate.engine.packed.roberta import PackedRobertaEncoder
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from tests.conftest import TOKENIZER_FILES
from tests.unit.test_decoder_models import FAMILIES, make_tiny_decoder

TEXTS = ["hi", "a much longer message about the weekly competition entry and its many rules", "ok", "yes", "no", "fine"]
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=130, pad_token_id=0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_xlmr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random XLM-R with the packaged (BERT) tokenizer, whose [PAD] is id 0, so the config says pad 0 too."""
    directory = tmp_path_factory.mktemp("tiny-xlmr")
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig(**TINY)).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_model_dir() / name, directory / name)
    return directory


@pytest.mark.parametrize("family", [RobertaModel(RobertaConfig(**TINY)), XLMRobertaModel(XLMRobertaConfig(**TINY))],
                         ids=["roberta", "xlm-roberta"])  # fmt: skip
@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:2]], ids=["length groups", "one grid"])
def test_roberta_families_match_transformers_on_packed_tokens(family: torch.nn.Module, texts: list[str], tiny_bert_dir: Path) -> None:
    """Positions count from padding_idx + 1, as RobertaEmbeddings numbers them."""
    model = family.eval()
    encoder = encoder_path(model, kernels=None).encoder
    assert isinstance(encoder, PackedRobertaEncoder)
    tokenizer = load_base_model(tiny_bert_dir, dtype="float32", device="cpu").tokenizer
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.inference_mode():
        expected = model(**batch)
        got = encoder(batch["input_ids"], batch["attention_mask"], Packing.from_mask(batch["attention_mask"]))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-4)


def test_xlm_roberta_with_lora_gives_the_padded_forwards_answers(tiny_xlmr_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward_module, "PACKING_MIN_WASTE", 0.0)  # pack every batch
    gen = torch.Generator().manual_seed(3)
    lora = {f"encoder.layer.{i}.{name}": (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen))
            for i in range(2) for name in ("attention.self.query", "attention.output.dense")}  # fmt: skip
    results = []
    for padding_free in (True, False):
        base = load_base_model(tiny_xlmr_dir, dtype="float32", device="cpu")
        forward = BatchForward(base, n_slots=1, max_rank=4, max_labels=2, padding_free=padding_free)
        assert isinstance(forward.packed, PackedRobertaEncoder) == padding_free
        forward.lora.install(0, lora, scaling=0.5)
        ids = base.tokenizer(TEXTS[:4])["input_ids"]
        results.append(forward([Row(i, lora_slot=s, pooling=Pooling.MEAN) for i, s in zip(ids, [0, -1, 0, -1])]))
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours.embedding, theirs.embedding, atol=1e-5)
    assert not np.allclose(results[0][0].embedding, results[0][1].embedding, atol=1e-3)


def test_an_unregistered_family_says_which_path_it_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = load_base_model(make_tiny_decoder(tmp_path, FAMILIES["gpt2"]), dtype="float32", device="cpu")
    assert type(base.model) not in PACKED_ENCODERS
    with caplog.at_level(logging.INFO, logger="adaptgate.engine.packed.registry"):
        forward = BatchForward(base, n_slots=1, max_rank=4, max_labels=2)
    assert forward.packed is None and forward.encoder_path.encoder is None
    assert forward.encoder_path.description.startswith("padded GPT2Model forward")
    assert "no packed encoder is registered for GPT2Model" in forward.encoder_path.description
    assert "GPT2Model runs its transformers forward on padded batches" in caplog.text


def test_a_registered_family_reports_padding_free(tiny_bert_dir: Path) -> None:
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    assert BatchForward(base, n_slots=1, max_rank=4, max_labels=2).encoder_path.description == "padding-free BertModel encoder"
    off = BatchForward(base, n_slots=1, max_rank=4, max_labels=2, padding_free=False).encoder_path
    assert off.encoder is None and "padding-free batches are off" in off.description
