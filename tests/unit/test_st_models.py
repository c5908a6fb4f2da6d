"""sentence-transformers model directories embed as their authors configured them (pooling, Normalize, length).

Each tiny random BERT is saved by sentence-transformers itself in one pooling configuration; the engine's
default path (no pooling, no normalize in the request) must give the vectors `SentenceTransformer.encode` gives.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import load_base_model
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from adaptgate.engine.st_config import UnsupportedModelConfig
from adaptgate.inference import Inference

TEXTS = [
    "hi",
    "are we still on for lunch tomorrow?",
    "free entry in a weekly competition to win the cup final tickets, text now to claim your prize",
    "ok",
]
LONG_TEXT = " ".join(["the weekly entry is a long message about nothing in particular"] * 6)
HIDDEN = 32
# (name, sentence-transformers pooling mode, Normalize module follows)
CONFIGS = [
    ("cls-normalize", "cls", True),  # BGE style
    ("cls", "cls", False),
    ("mean", "mean", False),
    ("mean-normalize", "mean", True),  # all-MiniLM-L6-v2 style
    ("lasttoken", "lasttoken", False),
    ("weightedmean", "weightedmean", True),
    ("max", "max", False),
    ("mean-sqrt-len", "mean_sqrt_len_tokens", False),
]


def save_st_model(
    bert_dir: Path,
    out: Path,
    mode: str,
    normalize: bool,
    max_seq_length: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    include_prompt: bool = True,
) -> Path:
    """A sentence-transformers directory saved by sentence-transformers' own modules (prompts in
    config_sentence_transformers.json, include_prompt in the Pooling config)."""
    with warnings.catch_warnings():  # `models` is the documented (now deprecated) home of these modules
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import SentenceTransformer, models

        transformer = models.Transformer(str(bert_dir), max_seq_length=max_seq_length)
        pooling = models.Pooling(HIDDEN, pooling_mode=mode, include_prompt=include_prompt)
        modules = [transformer, pooling] + ([models.Normalize()] if normalize else [])
        model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts, default_prompt_name=default_prompt_name)
        model.save(str(out))
    return out


def st_encode(directory: Path, texts: list[str], **kwargs: object) -> np.ndarray:
    """`SentenceTransformer.encode` of a fresh load (kwargs: prompt_name=, prompt=)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(directory), device="cpu").encode(texts, convert_to_numpy=True, **kwargs)


async def _engine_embed(directory: Path, texts: list[str], truncate: bool, prompt_name: str | None) -> list[np.ndarray]:
    """The serving default: Inference.embed with no pooling and no normalize asked for."""
    engine = Engine(load_base_model(directory, dtype="float32", device="cpu"), EngineConfig(n_slots=1, max_rank=4))
    engine.start()
    try:
        inference = Inference(engine, cache=None, max_texts=64)  # type: ignore[arg-type]  # no adapter: no cache
        out = await inference.embed(texts, None, None, None, truncate, None, prompt_name=prompt_name)
        return out.vectors
    finally:
        await engine.stop()


def engine_embed(directory: Path, texts: list[str], truncate: bool = False, prompt_name: str | None = None) -> np.ndarray:
    return np.stack(asyncio.run(_engine_embed(directory, texts, truncate, prompt_name)))


def assert_same_vectors(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Per text: the same direction (cosine >= 1 - 1e-5) and the same length (normalized or not)."""
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert (cos >= 1 - 1e-5).all(), cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-4)


@pytest.mark.parametrize(("name", "mode", "normalize"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_engine_embeds_like_sentence_transformers(
    tiny_bert_dir: Path, tmp_path: Path, name: str, mode: str, normalize: bool
) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / name, mode, normalize)
    assert_same_vectors(engine_embed(st_dir, TEXTS), st_encode(st_dir, TEXTS))


def _to_legacy_format(st_dir: Path, max_seq_length: int) -> None:
    """Rewrite a directory into the older layout all-MiniLM-L6-v2 ships with: `pooling_mode_*` flags,
    `sentence_transformers.models.*` module types and max_seq_length in sentence_bert_config.json."""
    pooling_file = st_dir / "1_Pooling" / "config.json"
    mode = json.loads(pooling_file.read_text())["pooling_mode"]
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
             "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
             "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
    legacy = {"word_embedding_dimension": HIDDEN} | {flag: name == mode for name, flag in flags.items()}
    pooling_file.write_text(json.dumps(legacy))
    modules = json.loads((st_dir / "modules.json").read_text())
    for module in modules:
        module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
    (st_dir / "modules.json").write_text(json.dumps(modules))
    (st_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))


@pytest.mark.parametrize("mode", ["cls", "weightedmean"])
def test_the_older_sentence_transformers_layout_is_read_too(tiny_bert_dir: Path, tmp_path: Path, mode: str) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / mode, mode, normalize=True)
    _to_legacy_format(st_dir, max_seq_length=12)
    base = load_base_model(st_dir, dtype="float32", device="cpu")
    assert base.spec.max_tokens == 12 and base.spec.normalize
    texts = TEXTS + [LONG_TEXT]
    assert_same_vectors(engine_embed(st_dir, texts, truncate=True), st_encode(st_dir, texts))


def test_max_seq_length_truncates_like_sentence_transformers(tiny_bert_dir: Path, tmp_path: Path) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / "short", "cls", normalize=True, max_seq_length=10)
    base = load_base_model(st_dir, dtype="float32", device="cpu")
    assert base.spec.max_tokens == 10
    ours = engine_embed(st_dir, [LONG_TEXT, "a short one"], truncate=True)
    assert_same_vectors(ours, st_encode(st_dir, [LONG_TEXT, "a short one"]))
    # The long text's vector is that of its first ten tokens (CLS ... SEP), exactly as the model sees them.
    ids = base.tokenizer(LONG_TEXT, truncation=True, max_length=10)["input_ids"]
    assert len(ids) == 10
    clipped = base.tokenizer.decode(ids[1:-1])
    assert_same_vectors(ours[:1], engine_embed(st_dir, [clipped]))


@pytest.mark.parametrize("mode", list(Pooling))
def test_every_pooling_gives_the_same_vectors_packed_and_padded(tiny_bert_dir: Path, mode: Pooling) -> None:
    """Pooling reads the padded grid the packed encoder unpacks to; both paths must agree row by row."""
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    packed = BatchForward(base, n_slots=1, max_rank=4, max_labels=2, padding_free=True, cpu_kernels=False)
    padded = BatchForward(base, n_slots=1, max_rank=4, max_labels=2, padding_free=False, cpu_kernels=False)
    assert packed.packed is not None and padded.packed is None
    ids = base.tokenizer(TEXTS)["input_ids"]  # lengths 3 to 20: far more pads than PACKING_MIN_WASTE allows
    rows = [Row(i, pooling=mode, normalize=False) for i in ids]
    for a, b in zip(packed(rows), padded(rows)):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-4, atol=1e-5)


def test_without_sentence_transformers_files_the_model_is_mean_pooled_and_normalized(tiny_bert_dir: Path) -> None:
    """A plain transformers directory keeps the engine's long-standing default."""
    spec = load_base_model(tiny_bert_dir, dtype="float32", device="cpu").spec
    assert spec.default_pooling is Pooling.MEAN and spec.normalize and spec.max_tokens == 128


def test_the_packaged_minilm_keeps_mean_pooling_normalize_and_256_tokens() -> None:
    spec = load_base_model(None, dtype="float32", device="cpu").spec
    assert (spec.default_pooling, spec.normalize, spec.max_tokens) == (Pooling.MEAN, True, 256)


def _rewrite_pooling(st_dir: Path, config: dict) -> Path:
    path = st_dir / "1_Pooling" / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"embedding_dimension": HIDDEN, "pooling_mode": "median"}, "median"),
        ({"word_embedding_dimension": HIDDEN, "pooling_mode_median_tokens": True}, "pooling_mode_median_tokens"),
        ({"embedding_dimension": HIDDEN, "pooling_mode": ["cls", "mean"]}, "cls+mean"),
        ({"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False}, "no pooling mode"),
    ],
    ids=["unknown-mode", "unknown-legacy-flag", "concatenation", "none"],
)
def test_an_unsupported_pooling_config_stops_startup_naming_mode_and_file(
    tiny_bert_dir: Path, tmp_path: Path, config: dict, named: str
) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / "odd", "mean", normalize=False)
    path = _rewrite_pooling(st_dir, config)
    with pytest.raises(UnsupportedModelConfig) as caught:
        load_base_model(st_dir, dtype="float32", device="cpu")
    assert named in caught.value.message and str(path) in caught.value.message


def test_a_module_the_engine_cannot_run_stops_startup(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A Dense projection after pooling would change every vector: refuse rather than embed without it."""
    st_dir = save_st_model(tiny_bert_dir, tmp_path / "dense", "mean", normalize=False)
    modules = json.loads((st_dir / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (st_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelConfig) as caught:
        load_base_model(st_dir, dtype="float32", device="cpu")
    assert "Dense" in caught.value.message and "modules.json" in caught.value.message
