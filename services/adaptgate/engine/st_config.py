"""How a sentence-transformers model directory says its vectors are made: pooling, Normalize, length.

A directory saved by sentence-transformers lists its modules in `modules.json` (Transformer, then
Pooling, then optionally Normalize). The engine runs the Transformer itself and reproduces Pooling
and Normalize; any other module (Dense, LayerNorm, ...) would change every vector, so such a
directory is refused at startup rather than served wrong. Both layouts are read: the older one
(`sentence_transformers.models.*` types, `pooling_mode_*` flags, max_seq_length in
sentence_bert_config.json, as all-MiniLM-L6-v2 ships) and the one sentence-transformers 5+ writes
(`pooling_mode` names, the length in the tokenizer's `model_max_length`).

Prompts (E5's "query: ", an instruction) come from config_sentence_transformers.json: a request names
one and its text is put before each text, as `SentenceTransformer.encode(prompt_name=...)` does; the
Pooling config's `include_prompt: false` keeps the prompt's tokens out of the pooled vector.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adaptgate.engine.pooling import Pooling
from adaptgate.errors import FailedPrecondition

MODULES_FILE = "modules.json"
SBERT_CONFIG_FILE = "sentence_bert_config.json"
PROMPTS_FILE = "config_sentence_transformers.json"
# Prompt names every sentence-transformers model answers to (with no text unless the model sets one), so a
# client may ask for "query" or "document" of any model, as `SentenceTransformer.encode(prompt_name=...)` allows.
DEFAULT_PROMPTS: dict[str, str] = {"query": "", "document": ""}

# sentence-transformers' pooling mode names, and the engine's pooling for each.
POOLING_MODES: dict[str, Pooling] = {
    "cls": Pooling.CLS,
    "mean": Pooling.MEAN,
    "max": Pooling.MAX,
    "mean_sqrt_len_tokens": Pooling.MEAN_SQRT_LEN,
    "weightedmean": Pooling.WEIGHTED_MEAN,
    "lasttoken": Pooling.LAST_TOKEN,
}
# The older config's boolean flags, each naming one mode.
LEGACY_FLAGS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
LEGACY_FLAG_PREFIX = "pooling_mode_"


class UnsupportedModelConfig(FailedPrecondition):
    """The model directory asks for something the engine cannot reproduce exactly."""


@dataclass(frozen=True)
class SentenceTransformerConfig:
    pooling: Pooling
    normalize: bool  # a Normalize module follows Pooling: vectors are unit length
    max_seq_length: int | None  # sentence_bert_config.json's cap on tokens per text; None when it sets none
    prompts: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))  # name -> text put before a text
    default_prompt_name: str | None = None  # the prompt a request that names none gets
    include_prompt: bool = True  # Pooling's include_prompt: False keeps the prompt's tokens out of the vector


@dataclass(frozen=True)
class _Module:
    kind: str  # the class name: Transformer, Pooling, Normalize, Dense, ...
    path: str  # folder of its files, relative to the model directory


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelConfig(f"{path} is not readable JSON ({exc}); repair or remove it") from exc


def _modules(directory: Path) -> list[_Module]:
    """modules.json in pipeline order; the class name is the last part of `type`, whichever package path."""
    entries = _read_json(directory / MODULES_FILE)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
        raise UnsupportedModelConfig(f"{directory / MODULES_FILE} must be a list of modules with a `type` each")
    ordered = sorted(entries, key=lambda e: int(e.get("idx", 0)))
    return [_Module(str(e["type"]).rsplit(".", 1)[-1], str(e.get("path", ""))) for e in ordered]


def _check_pipeline(directory: Path, modules: list[_Module]) -> None:
    """Transformer (in the directory itself), Pooling, then at most a Normalize: what the engine runs."""
    kinds = [m.kind for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UnsupportedModelConfig(
            f"{directory / MODULES_FILE} lists modules {kinds}; the engine runs Transformer, Pooling and an "
            "optional Normalize only, so this model's vectors cannot be reproduced: serve a model without the others"
        )
    if modules[0].path not in ("", "."):
        raise UnsupportedModelConfig(
            f"{directory / MODULES_FILE} keeps the Transformer in {modules[0].path!r}; the engine loads the weights "
            "from the model directory itself: save the model with a current sentence-transformers"
        )


def _pooling_modes(config: dict) -> list[str]:
    """The mode names a Pooling config turns on: `pooling_mode` (a name or a list), else the older flags."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return [str(m) for m in mode] if isinstance(mode, list) else [str(mode)]
    flags = [key for key, on in config.items() if key.startswith(LEGACY_FLAG_PREFIX) and on is True]
    return [LEGACY_FLAGS.get(key, key) for key in flags]


def read_pooling(path: Path) -> Pooling:
    """The one pooling a Pooling config asks for; several (concatenated) or unknown ones are refused."""
    config = _read_json(path)
    modes = _pooling_modes(config) if isinstance(config, dict) else []
    if not modes:
        raise UnsupportedModelConfig(f"{path} turns on no pooling mode; set one of {sorted(POOLING_MODES)}")
    if len(modes) > 1:
        raise UnsupportedModelConfig(
            f"{path} concatenates pooling modes {'+'.join(modes)}; the engine serves one mode per model, "
            f"one of {sorted(POOLING_MODES)}"
        )
    if modes[0] not in POOLING_MODES:
        raise UnsupportedModelConfig(
            f"{path} asks for pooling mode {modes[0]!r}, which the engine does not support; "
            f"supported: {sorted(POOLING_MODES)}"
        )
    return POOLING_MODES[modes[0]]


def read_include_prompt(path: Path) -> bool:
    """Pooling's `include_prompt` (sentence-transformers 3+ writes it; older configs mean True)."""
    config = _read_json(path)
    include = config.get("include_prompt", True) if isinstance(config, dict) else True
    if not isinstance(include, bool):
        raise UnsupportedModelConfig(f"{path} sets include_prompt to {include!r}; it must be true or false")
    return include


def read_prompts(directory: Path) -> tuple[dict[str, str], str | None]:
    """config_sentence_transformers.json's prompts (over the defaults every model has) and default_prompt_name.

    A default naming no prompt is refused, as sentence-transformers refuses to load such a model."""
    path = directory / PROMPTS_FILE
    config = _read_json(path) if path.exists() else {}
    if not isinstance(config, dict):
        raise UnsupportedModelConfig(f"{path} must be a JSON object")
    saved = config.get("prompts") or {}
    if not isinstance(saved, dict) or not all(isinstance(v, str | None) for v in saved.values()):
        raise UnsupportedModelConfig(f"{path} `prompts` must map prompt names to texts")
    prompts = DEFAULT_PROMPTS | {str(name): text or "" for name, text in saved.items()}
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise UnsupportedModelConfig(
            f"{path} sets default_prompt_name {default!r}, which is none of its prompts {sorted(prompts)}; "
            "name one of them or remove it"
        )
    return prompts, default


def _max_seq_length(directory: Path) -> int | None:
    path = directory / SBERT_CONFIG_FILE
    if not path.exists():
        return None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise UnsupportedModelConfig(f"{path} must be a JSON object")
    if config.get("do_lower_case"):
        raise UnsupportedModelConfig(
            f"{path} sets do_lower_case, which the engine does not apply; use a lower-casing tokenizer instead"
        )
    length = config.get("max_seq_length")
    return int(length) if length is not None else None


def read_st_config(directory: Path) -> SentenceTransformerConfig | None:
    """The directory's sentence-transformers pipeline, or None when it has no modules.json (plain transformers)."""
    if not (directory / MODULES_FILE).exists():
        return None
    modules = _modules(directory)
    _check_pipeline(directory, modules)
    pooling_file = directory / modules[1].path / "config.json"
    prompts, default_prompt_name = read_prompts(directory)
    return SentenceTransformerConfig(
        read_pooling(pooling_file),
        normalize=len(modules) == 3,
        max_seq_length=_max_seq_length(directory),
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        include_prompt=read_include_prompt(pooling_file),
    )


def max_seq_length(directory: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length, also for a directory with no modules.json."""
    return _max_seq_length(directory)
