"""The adapter directory format: PEFT's files plus the task head's labels and input.

Files (all optional ones may be absent in uploads made with plain PEFT):
- adapter_config.json        PEFT LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
- adapter_model.safetensors  LoRA A/B under PEFT's key names, and the head as
                             `base_model.model.classifier.{weight,bias}` (or `score.*` for decoders)
- labels.json                label names in id order (default: LABEL_0 ...)
- adaptgate.json             {"head_input": "pooler" or a pooling name ("mean", "cls", "last_token", ...), "normalize": bool,
                              "base_fingerprint": str, "source": str, optionally "abstain": {"threshold": 0..1,
                              "label": str}}; absent means a PEFT-made
                             adapter whose head reads the task model's own input (BERT's pooler,
                             a decoder's last token)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import save

from adaptgate.engine.pooling import Pooling

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
META_FILE = "adaptgate.json"
ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE, META_FILE})
HEAD_MODULES = ("classifier", "score")
HEAD_INPUTS = frozenset({"pooler", *(p.value for p in Pooling)})  # a head may read any pooling the engine has


@dataclass
class AdapterWeights:
    """A validated adapter, ready to be copied into an engine slot. Shapes follow PEFT."""

    labels: list[str]
    head_weight: torch.Tensor | None  # [num_labels, hidden]
    head_bias: torch.Tensor | None  # [num_labels]
    head_input: str
    normalize_head_input: bool
    rank: int = 0
    scaling: float = 1.0
    # base-model module name -> (A [r, in], B [out, r])
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=list)
    # Classify answers abstain_label when the top score is below abstain_threshold (None: never).
    abstain_threshold: float | None = None
    abstain_label: str = ""

    @property
    def size_bytes(self) -> int:
        tensors = [t for pair in self.lora.values() for t in pair]
        tensors += [t for t in (self.head_weight, self.head_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def head_only_files(
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: list[str],
    base_fingerprint: str,
    source: str,
    head_input: str = "mean",
    normalize: bool = True,
    abstain: tuple[float, str] | None = None,
) -> dict[str, bytes]:
    """Files of an adapter that is just a linear head over pooled base embeddings (the `head` job);
    `abstain` is (threshold, label) when the job calibrated one (training/methods/abstain.py)."""
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": 0,
        "lora_alpha": 0,
        "target_modules": [],
        "modules_to_save": ["classifier"],
        "base_model_name_or_path": None,
    }
    tensors = {
        "base_model.model.classifier.weight": weight.detach().float().contiguous(),
        "base_model.model.classifier.bias": bias.detach().float().contiguous(),
    }
    meta: dict[str, object] = {"head_input": head_input, "normalize": normalize, "base_fingerprint": base_fingerprint, "source": source}
    if abstain is not None:
        meta["abstain"] = {"threshold": abstain[0], "label": abstain[1]}
    return {
        CONFIG_FILE: json.dumps(config, indent=2).encode(),
        WEIGHTS_FILE: save(tensors),
        LABELS_FILE: json.dumps(labels).encode(),
        META_FILE: json.dumps(meta, indent=2).encode(),
    }


def lora_files(
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    labels: list[str],
    base_fingerprint: str,
    source: str,
    base_prefix: str = "",
    head_input: str = "mean",
    normalize: bool = False,
) -> dict[str, bytes]:
    """Files of a LoRA adapter with its task head, as PEFT saves a SEQ_CLS model (the `lora` job),
    or of a LoRA-only adapter for `Embed` when `weight` is None (the `embed` job: no head, no labels).

    `lora` maps base-model module names (`encoder.layer.5.attention.self.query`) to (A [r, in],
    B [out, r]). Keys carry the task model's prefix (`bert.` for BERT) as PEFT writes them, and
    `target_modules` lists the exact module names, so PEFT's own loader adapts the same layers.
    """
    prefix = f"base_model.model.{base_prefix}." if base_prefix else "base_model.model."
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": int(rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(lora),
        "modules_to_save": ["classifier"] if weight is not None else None,
        "base_model_name_or_path": None,
    }
    if weight is None:
        config["task_type"] = "FEATURE_EXTRACTION"
    tensors = {}
    for module, (a, b) in lora.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{prefix}{module}.lora_B.weight"] = b.detach().float().contiguous()
    if weight is not None:
        tensors["base_model.model.classifier.weight"] = weight.detach().float().contiguous()
        head_bias = bias if bias is not None else torch.zeros(weight.shape[0])
        tensors["base_model.model.classifier.bias"] = head_bias.detach().float().contiguous()
    meta = {"head_input": head_input, "normalize": normalize, "base_fingerprint": base_fingerprint, "source": source}
    files = {
        CONFIG_FILE: json.dumps(config, indent=2).encode(),
        WEIGHTS_FILE: save(tensors),
        META_FILE: json.dumps(meta, indent=2).encode(),
    }
    if weight is not None:
        files[LABELS_FILE] = json.dumps(labels).encode()
    return files
