"""Decoder-only bases (GPT-2, Llama, Qwen2): PEFT SEQ_CLS adapters served in mixed batches give PEFT's answers.

Tiny random models reuse the packaged BERT tokenizer (vocab 30522, [PAD]=0, [SEP] last), so the
last real token of every row is [SEP] and transformers' "rightmost token != pad_token_id" lands
on the same position as the engine's "rightmost attended token".
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    PreTrainedModel,
    PretrainedConfig,
    Qwen2Config,
    Qwen2Model,
    RobertaConfig,
)

from adaptgate.adapters.format import AdapterWeights
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.engine import Engine, EngineConfig, HeadWeights
from adaptgate.engine.model import BaseModel, _prepare_decoder_tokenizer, is_decoder_only, load_base_model, packaged_model_dir
from adaptgate.engine.pooling import Pooling, last_token_pool, pool, without_pad_tokens
from adaptgate.engine.rows import Row
from adaptgate.errors import BaseModelMismatch
from tests.conftest import TOKENIZER_FILES
from tests.unit.peft_adapters import adapter_files, make_decoder_peft_adapter

TEXTS = ["free entry in a weekly competition", "are we still on for lunch?", "URGENT! you have won", "ok see you soon"]
HIDDEN = 32
# The packaged BERT tokenizer's ids: [PAD]=0, [CLS]=101, [SEP]=102.
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Family:
    """A decoder family: how to build a tiny base, and the adapters (labels, rank, targets) to try on it."""

    name: str
    build: Callable[[], PreTrainedModel]
    adapters: tuple[tuple[int, int, tuple[str, ...]], ...]
    fan_in_fan_out: bool = False


def _llama() -> PreTrainedModel:
    return LlamaModel(LlamaConfig(
        vocab_size=30522, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, **SPECIAL_IDS,
    ))


def _qwen2() -> PreTrainedModel:
    return Qwen2Model(Qwen2Config(
        vocab_size=30522, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, **SPECIAL_IDS,
    ))


def _gpt2() -> PreTrainedModel:
    return GPT2Model(GPT2Config(vocab_size=30522, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=128, **SPECIAL_IDS))


FAMILIES = {
    # num_key_value_heads=1 makes k/v_proj [32 -> 16], unlike q/o_proj [32 -> 32]: shapes are checked per module.
    "llama": Family("llama", _llama, ((2, 4, tuple(ATTN)), (3, 8, tuple(ATTN + MLP)), (5, 2, ("q_proj", "v_proj")))),
    "qwen2": Family("qwen2", _qwen2, ((2, 4, tuple(ATTN)), (4, 8, tuple(ATTN + MLP)), (3, 2, ("k_proj", "o_proj")))),
    # Every GPT-2 projection is a Conv1D: c_attn [32 -> 96], attn.c_proj [32 -> 32], c_fc [32 -> 128], mlp.c_proj [128 -> 32].
    "gpt2": Family("gpt2", _gpt2, ((2, 4, ("c_attn", "c_proj")), (3, 8, ("c_attn",)), (4, 2, ("c_fc", "c_proj"))), True),
}


def make_tiny_decoder(directory: Path, family: Family, seed: int = 0) -> Path:
    """The packaged BERT tokenizer, told to act like a decoder's: no token_type_ids (GPT-2 would embed them)."""
    torch.manual_seed(seed)
    family.build().save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_model_dir() / name, directory / name)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.update(model_input_names=["input_ids", "attention_mask"], bos_token="[CLS]", eos_token="[SEP]")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@dataclass
class Setup:
    model_dir: Path
    peft_models: list[torch.nn.Module]
    weights: list[AdapterWeights]

    def base(self) -> BaseModel:
        """A fresh copy each time: engines wrap the model's projections in place."""
        return load_base_model(self.model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    family = FAMILIES[request.param]
    model_dir = make_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{family.name}"), family)
    validator = AdapterValidator(load_base_model(model_dir, dtype="float32", device="cpu").spec, max_rank=16, max_labels=8)
    peft_models, weights = [], []
    for seed, (labels, rank, targets) in enumerate(family.adapters):
        out = tmp_path_factory.mktemp(f"{family.name}-adapter{seed}")
        peft_models.append(make_decoder_peft_adapter(model_dir, out, labels, rank, seed + 10, list(targets), family.fan_in_fan_out))
        weights.append(validator.parse(adapter_files(out)))
    return Setup(model_dir, peft_models, weights)


def peft_probabilities(peft_model: torch.nn.Module, base: BaseModel, texts: list[str]) -> np.ndarray:
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(peft_model(**batch).logits, dim=-1).numpy()


async def run_engine(setup: Setup, rows_spec: list[tuple[str, int]], with_lora: bool = True) -> list[np.ndarray]:
    engine = Engine(setup.base(), EngineConfig(n_slots=4, max_rank=16, max_labels=8))
    engine.start()
    try:
        for slot, w in enumerate(setup.weights):
            head = HeadWeights(w.head_weight, w.head_bias, w.head_input, w.normalize_head_input)
            await engine.install(slot, w.lora if with_lora else {}, w.scaling, head)
        ids = await engine.tokenize([t for t, _ in rows_spec], truncate=False)
        results = await engine.run([Row(i, lora_slot=s, head_slots=(s,)) for i, (_, s) in zip(ids, rows_spec)])
        return [r.probabilities[0] for r in results]
    finally:
        await engine.stop()


def test_peft_keys_map_onto_the_base_modules(setup: Setup) -> None:
    """`base_model.model.<prefix>.` is stripped for each family; every PEFT LoRA module lands on a base module."""
    spec = setup.base().spec
    for peft_model, w in zip(setup.peft_models, setup.weights):
        prefix = f"base_model.model.{spec.base_prefix}."
        peft_modules = {n.removeprefix(prefix) for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}
        assert set(w.lora) == peft_modules
        assert w.head_input == "last_token"
        assert w.head_weight is not None and torch.count_nonzero(w.head_bias) == 0  # `score` has no bias
        for module, (a, b) in w.lora.items():
            fan_in, fan_out = spec.linear_shapes[module]
            assert a.shape == (w.rank, fan_in) and b.shape == (fan_out, w.rank)


def test_mixed_batch_matches_peft_for_every_adapter(setup: Setup) -> None:
    rows = [(text, slot) for text in TEXTS for slot in range(len(setup.weights))]
    got = asyncio.run(run_engine(setup, rows))
    base = setup.base()
    for slot, (peft_model, weights) in enumerate(zip(setup.peft_models, setup.weights)):
        expected = peft_probabilities(peft_model, base, TEXTS)
        ours = np.stack([p for p, (_, s) in zip(got, rows) if s == slot])
        assert ours.shape == expected.shape == (len(TEXTS), len(weights.labels))
        np.testing.assert_allclose(ours, expected, atol=1e-4)
    # The LoRA deltas must matter, or the comparison above would only test the heads.
    head_only = asyncio.run(run_engine(setup, rows, with_lora=False))
    assert not np.allclose(np.concatenate(got), np.concatenate(head_only), atol=1e-3)


def test_a_rows_answer_does_not_depend_on_its_batch_mates(setup: Setup) -> None:
    alone = asyncio.run(run_engine(setup, [(TEXTS[0], 1)]))[0]
    crowded = asyncio.run(run_engine(setup, [(TEXTS[2], 0), (TEXTS[0], 1), (TEXTS[3], 2), (TEXTS[1], 1)]))[1]
    np.testing.assert_allclose(alone, crowded, atol=1e-5)


def test_bare_rows_embed_with_the_last_token_of_the_plain_model(setup: Setup) -> None:
    """Rows without adapter next to LoRA rows get the unadapted last-token state (the decoders' default pooling)."""
    base = setup.base()
    assert base.spec.default_pooling is Pooling.LAST_TOKEN
    with torch.no_grad():
        expected = [base.model(**base.tokenizer(t, return_tensors="pt")).last_hidden_state[0, -1].numpy() for t in TEXTS]

    async def embed() -> list[np.ndarray]:
        engine = Engine(setup.base(), EngineConfig(n_slots=4, max_rank=16, max_labels=8))
        engine.start()
        try:
            w = setup.weights[1]
            await engine.install(0, w.lora, w.scaling, None)
            ids = await engine.tokenize(TEXTS + TEXTS, truncate=False)
            rows = [Row(i, lora_slot=0 if k >= len(TEXTS) else -1, pooling=Pooling.LAST_TOKEN, normalize=False) for k, i in enumerate(ids)]
            return [r.embedding for r in await engine.run(rows)]
        finally:
            await engine.stop()

    got = asyncio.run(embed())
    np.testing.assert_allclose(np.stack(got[: len(TEXTS)]), np.stack(expected), atol=1e-5)
    assert not np.allclose(np.stack(got[len(TEXTS) :]), np.stack(expected), atol=1e-3)


def test_an_adapter_for_another_family_is_refused(setup: Setup, tmp_path: Path) -> None:
    """Same hidden size, other module names: a Llama adapter does not fit GPT-2 and vice versa."""
    spec = setup.base().spec
    other = FAMILIES["llama" if spec.model_type == "gpt2" else "gpt2"]
    other_dir = make_tiny_decoder(tmp_path / "other", other)
    labels, rank, targets = other.adapters[0]
    make_decoder_peft_adapter(other_dir, tmp_path / "adapter", labels, rank, 0, list(targets), other.fan_in_fan_out)
    with pytest.raises(BaseModelMismatch):
        AdapterValidator(spec, max_rank=16, max_labels=8).parse(adapter_files(tmp_path / "adapter"))


def test_encoder_and_decoder_specs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    bert = load_base_model(tiny_bert_dir, dtype="float32", device="cpu").spec
    assert not bert.is_decoder and bert.default_pooling is Pooling.MEAN and "pooler.dense" in bert.linear_shapes

    gpt2 = load_base_model(make_tiny_decoder(tmp_path / "gpt2", FAMILIES["gpt2"]), dtype="float32", device="cpu")
    assert gpt2.spec.is_decoder and gpt2.spec.default_pooling is Pooling.LAST_TOKEN
    assert gpt2.spec.base_prefix == "transformer" and "pooler.dense" not in gpt2.spec.linear_shapes
    # Conv1D weights are [in, out]; the spec must still say (in, out).
    assert gpt2.spec.linear_shapes["h.0.attn.c_attn"] == (HIDDEN, 3 * HIDDEN)
    assert gpt2.spec.linear_shapes["h.0.mlp.c_fc"] == (HIDDEN, 4 * HIDDEN)
    assert gpt2.spec.linear_shapes["h.0.mlp.c_proj"] == (4 * HIDDEN, HIDDEN)
    assert gpt2.tokenizer.padding_side == "right"


@pytest.mark.parametrize(
    ("config", "decoder"),
    [
        (BertConfig(), False),
        (RobertaConfig(), False),
        (BertConfig(is_decoder=True), True),
        (GPT2Config(), True),
        (LlamaConfig(), True),
        (Qwen2Config(), True),
        (MistralConfig(), True),
    ],
)
def test_decoder_only_is_read_from_the_config(config: PretrainedConfig, decoder: bool) -> None:
    assert is_decoder_only(config) is decoder


def test_a_decoder_tokenizer_without_pad_token_pads_with_eos() -> None:
    """GPT-2 and Llama tokenizers ship without a pad token; padding is masked, so eos stands in."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir(), local_files_only=True)
    tokenizer.padding_side = "left"
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    _prepare_decoder_tokenizer(tokenizer)
    assert tokenizer.pad_token == "[SEP]" and tokenizer.padding_side == "right"


def test_last_token_pool_finds_the_last_real_token_on_either_padding_side() -> None:
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)  # [B=2, T=4, H=1]; value = 4·row + position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert pool(hidden, right, Pooling.LAST_TOKEN).flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, Pooling.LAST_TOKEN).flatten().tolist() == [3.0, 7.0]


def test_without_pad_tokens_reproduces_transformers_choice_when_pad_is_eos(tmp_path: Path) -> None:
    """pad = eos = [SEP] and every text ends with [SEP]: transformers reads the token before it."""
    from transformers import AutoModelForSequenceClassification

    model_dir = make_tiny_decoder(tmp_path / "llama", FAMILIES["llama"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, pad_token_id=102).eval()
    base = load_base_model(model_dir, dtype="float32", device="cpu")
    batch = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch["input_ids"].masked_fill_(batch["attention_mask"] == 0, 102)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        expected = model(**batch).logits
        plain = model.score(last_token_pool(hidden, batch["attention_mask"]))
        matched = model.score(last_token_pool(hidden, without_pad_tokens(batch["attention_mask"], batch["input_ids"], 102)))
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(matched, expected, atol=1e-5, rtol=0)
