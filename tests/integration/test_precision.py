"""Accuracy bound of the reduced-precision path: bf16 (padding-free) embeddings vs fp32, packaged model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaptgate.engine import forward as forward_module
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import load_base_model
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row

pytestmark = pytest.mark.integration
SMS = Path(__file__).resolve().parents[2] / "examples" / "data" / "sms_spam" / "test.jsonl"


def embeddings(dtype: str, texts: list[str], pack: bool, cpu_kernels: bool = True) -> np.ndarray:
    base = load_base_model(None, dtype=dtype, device="cpu")
    forward = BatchForward(base, n_slots=1, max_rank=8, max_labels=2, padding_free=pack, cpu_kernels=cpu_kernels)
    ids = base.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    rows = [r for start in range(0, len(ids), 32) for r in forward([Row(i, pooling=Pooling.MEAN) for i in ids[start : start + 32]])]
    return np.stack([r.embedding for r in rows])


def test_bf16_padding_free_embeddings_stay_within_cosine_0999_of_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward_module, "PACKING_MIN_WASTE", 0.0)
    texts = [json.loads(line)["text"] for line in SMS.read_text().splitlines()[:256]]
    reference = embeddings("float32", texts, pack=False)  # transformers' own padded forward in fp32
    packed_fp32 = embeddings("float32", texts, pack=True)
    np.testing.assert_allclose(packed_fp32, reference, atol=2e-5)  # packing itself changes nothing
    for kernels in (True, False):  # the CPU kernels' attention where they build here, and PyTorch's SDPA
        ours = embeddings("bfloat16", texts, pack=True, cpu_kernels=kernels)
        cosine = (ours * reference).sum(axis=1)  # both L2-normalized
        print(f"bf16 (cpu_kernels={kernels}) vs fp32 cosine over {len(texts)} SMS texts: min {cosine.min():.5f}, mean {cosine.mean():.6f}")
        assert cosine.min() >= 0.999, cosine.min()


def test_int8_embeddings_stay_within_the_stated_bound_and_do_not_depend_on_batch_mates() -> None:
    texts = [json.loads(line)["text"] for line in SMS.read_text().splitlines()[:256]]
    reference = embeddings("float32", texts, pack=False)
    ours = embeddings("int8", texts, pack=True)
    cosine = (ours * reference).sum(axis=1)
    print(f"int8 vs fp32 cosine over {len(texts)} SMS texts: min {cosine.min():.5f}, mean {cosine.mean():.6f}")
    assert cosine.min() >= 0.99 and cosine.mean() >= 0.999, (cosine.min(), cosine.mean())
    alone = embeddings("int8", texts[:1], pack=True)  # activations are quantized per token, not per batch
    assert float((alone[0] * ours[0]).sum()) >= 0.9999
