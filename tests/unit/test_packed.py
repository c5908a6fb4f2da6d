"""The padding-free encoder gives transformers' own answers, with and without LoRA on some rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine import forward as forward_module
from adaptgate.engine.lora import reference as lora_module
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.lora import LoraChunks, chunk_length
from adaptgate.engine.model import load_base_model
from adaptgate.engine.packed import Packing, PackedBertEncoder, attention_groups, supports_packing, token_bucket
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from tests.unit.peft_adapters import adapter_files, make_peft_adapter

TEXTS = ["hi", "a much longer message about the weekly competition entry", "URGENT! you have won", "ok"]


def test_pack_and_unpack_keep_rows_contiguous() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    packing = Packing.from_mask(mask)
    grid = torch.arange(12.0).view(3, 4, 1)
    packed = packing.pack(grid)
    assert packed.squeeze(1).tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    back = packing.unpack(packed)
    assert torch.equal(back, grid * mask.unsqueeze(-1))


def test_packed_tensors_carry_a_bucket_of_rows_so_batches_share_shapes() -> None:
    assert [token_bucket(n) for n in (1, 8, 9, 127, 128, 129, 425, 1000)] == [8, 8, 16, 128, 128, 136, 432, 1024]
    assert all(n <= token_bucket(n) <= max(n + 7, n * 17 // 16) for n in range(1, 5000))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    packing = Packing.from_mask(mask)
    packed = packing.pack(torch.arange(9.0).view(3, 3, 1))
    assert packing.tokens == 6 and packed.squeeze(1).tolist() == [0, 1, 3, 4, 5, 6, 6, 6]  # filler repeats the last
    assert torch.equal(packing.unpack(packed), torch.arange(9.0).view(3, 3, 1) * mask.unsqueeze(-1))


def test_padded_batches_round_their_width_but_a_single_row_keeps_its_own(tiny_bert_dir: Path) -> None:
    forward = BatchForward(load_base_model(tiny_bert_dir, dtype="float32", device="cpu"), n_slots=1, max_rank=8, max_labels=2)
    ids, mask = forward._pad([Row([1, 2, 3, 4, 5]), Row([1, 2])])
    assert ids.shape == (2, 8) and mask.sum().item() == 7  # shared matmul shapes across batches
    assert forward._pad([Row([1, 2, 3, 4, 5])])[0].shape == (1, 5)  # no padding on a lone short request


def test_only_bert_encoders_are_packed(tiny_bert_dir: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    assert supports_packing(load_base_model(tiny_bert_dir, dtype="float32", device="cpu").model)
    assert not supports_packing(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)))


def _forward(tiny_bert_dir: Path, padding_free: bool, weights, rows_spec: list[tuple[list[int], int]]):
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    forward = BatchForward(base, n_slots=2, max_rank=8, max_labels=4, padding_free=padding_free)
    assert (forward.packed is not None) == padding_free
    forward.lora.install(0, weights.lora, weights.scaling)
    forward.heads.install(0, weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
    rows = [Row(ids, lora_slot=slot, head_slots=(slot,) if slot >= 0 else (), pooling=Pooling.MEAN) for ids, slot in rows_spec]
    return forward(rows)


def test_lora_chunks_put_every_lora_token_on_its_own_rows_grid() -> None:
    lengths = [3, 9, 1, 6]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    packing = Packing.from_mask(mask)
    rows, slots = torch.tensor([1, 2, 3]), torch.tensor([5, 6, 7])  # row 0 has no adapter
    chunks = LoraChunks.build(packing, rows, slots)
    assert chunks.length == chunk_length([9, 1, 6])
    assert not chunks.every_token
    assert torch.equal(chunks.tokens, torch.arange(3, 19))  # rows 1..3 of the packed tokens, in order
    assert torch.equal(chunks.gather[chunks.positions], chunks.tokens)  # each token reads itself back
    per_chunk = chunks.gather.view(-1, chunks.length)
    row_of_token = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    for chunk, slot in zip(per_chunk, chunks.slots.tolist()):
        assert set(row_of_token[chunk].tolist()) == {slot - 4}  # a chunk never mixes rows (so never adapters)


def test_chunk_length_trades_padding_against_chunk_count() -> None:
    assert chunk_length([13] * 32) == 16
    assert chunk_length([500] * 4) == 512
    assert chunk_length([3] * 32) == 8


@pytest.mark.parametrize("targets", [None, ["query", "value", "dense"]])
@pytest.mark.parametrize("chunk_lengths", [lora_module.CHUNK_LENGTHS, (4,)])
def test_padding_free_matches_the_padded_forward(
    tiny_bert_dir: Path,
    tmp_path: Path,
    targets: list[str] | None,
    chunk_lengths: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(forward_module, "PACKING_MIN_WASTE", 0.0)  # pack every batch, however little padding it has
    monkeypatch.setattr(lora_module, "CHUNK_LENGTHS", chunk_lengths)  # (4,): rows span several chunks
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    make_peft_adapter(tiny_bert_dir, tmp_path, 3, 4, seed=7, targets=targets)
    weights = AdapterValidator(base.spec, max_rank=8, max_labels=4).parse(adapter_files(tmp_path))
    ids = base.tokenizer(TEXTS)["input_ids"]
    spec = [(ids[0], 0), (ids[1], -1), (ids[2], 0), (ids[3], -1), (ids[1], 0)]  # LoRA on some rows only
    packed = _forward(tiny_bert_dir, True, weights, spec)
    padded = _forward(tiny_bert_dir, False, weights, spec)
    for ours, theirs in zip(packed, padded):
        np.testing.assert_allclose(ours.embedding, theirs.embedding, atol=1e-5)
        for p, q in zip(ours.probabilities, theirs.probabilities):
            np.testing.assert_allclose(p, q, atol=1e-5)
    assert not np.allclose(packed[1].embedding, packed[4].embedding, atol=1e-3)  # the adapter changes the row
    every_row = [(ids[1], 0), (ids[0], 0), (ids[2], 0)]  # every token carries LoRA: deltas added in place
    for ours, theirs in zip(_forward(tiny_bert_dir, True, weights, every_row), _forward(tiny_bert_dir, False, weights, every_row)):
        np.testing.assert_allclose(ours.embedding, theirs.embedding, atol=1e-5)


def test_attention_groups_cover_every_token_once_and_only_when_they_pay() -> None:
    lengths = [3, 40, 4, 5, 38, 6, 3, 4]
    mask = torch.tensor([[1] * n + [0] * (40 - n) for n in lengths])
    groups = attention_groups(mask)
    assert groups is not None and 1 < len(groups) <= 4
    tokens = torch.cat([g.tokens for g in groups]).sort().values
    assert torch.equal(tokens, torch.arange(sum(lengths)))
    assert sum(g.rows for g in groups) == len(lengths)
    assert all(g.positions.max() < g.rows * g.width for g in groups)
    assert attention_groups(torch.ones(8, 12, dtype=torch.long)) is None  # equal lengths: one grid


def test_grouped_attention_matches_transformers(tiny_bert_dir: Path) -> None:
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    texts = ["hi", "ok", "a much longer message about the weekly competition entry and its many rules", "yes", "no", "fine"]
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    assert attention_groups(batch["attention_mask"]) is not None
    with torch.inference_mode():
        expected = base.model(**batch)
        got = PackedBertEncoder(base.model)(batch["input_ids"], batch["attention_mask"], Packing.from_mask(batch["attention_mask"]))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-4)
