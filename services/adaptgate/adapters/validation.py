"""Validate an adapter's files before any weight reaches the model.

Order: file names (safetensors only), adapter_config.json, the tensors against the base model's
module shapes, labels, then adaptgate.json's fingerprint. Malformed files are InvalidAdapter;
files that are fine but made for another base model are BaseModelMismatch.
"""

from __future__ import annotations

import json
import math
import re

import torch
from safetensors.torch import load as load_safetensors

from adaptgate.adapters.format import (
    ALLOWED_FILES,
    CONFIG_FILE,
    HEAD_INPUTS,
    HEAD_MODULES,
    LABELS_FILE,
    META_FILE,
    WEIGHTS_FILE,
    AdapterWeights,
)
from adaptgate.engine.model import ModelSpec
from adaptgate.errors import BaseModelMismatch, InvalidAdapter

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PEFT_PREFIX = "base_model.model."


def check_filenames(names: list[str]) -> None:
    for name in names:
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidAdapter(f"{name!r} is a pickle file; adaptgate loads only safetensors (save with safe_serialization=True)")
        if name not in ALLOWED_FILES:
            raise InvalidAdapter(f"unexpected file {name!r}; an adapter holds only {', '.join(sorted(ALLOWED_FILES))}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in names:
            raise InvalidAdapter(f"{required} is missing")


def _json(files: dict[str, bytes], name: str) -> object:
    try:
        return json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{name} is not valid JSON: {exc}") from None


class AdapterValidator:
    def __init__(self, spec: ModelSpec, max_rank: int, max_labels: int) -> None:
        self.spec = spec
        self.max_rank = max_rank
        self.max_labels = max_labels

    def parse(self, files: dict[str, bytes]) -> AdapterWeights:
        check_filenames(list(files))
        config = self._config(files)
        meta = self._meta(files)
        tensors = self._tensors(files)
        rank = int(config["r"])
        lora = self._lora(tensors, rank, config)
        head_w, head_b = self._head(tensors)
        if tensors:
            raise InvalidAdapter(f"unexpected tensors in {WEIGHTS_FILE}: {', '.join(sorted(tensors)[:5])}")
        if not lora and head_w is None:
            raise InvalidAdapter("the adapter has neither LoRA weights nor a task head")
        labels = self._labels(files, head_w)
        alpha = float(config.get("lora_alpha", rank) or 0)
        scaling = (alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank) if rank else 0.0
        return AdapterWeights(
            labels=labels,
            head_weight=head_w,
            head_bias=head_b,
            head_input=self._head_input(meta, head_w),
            normalize_head_input=bool(meta.get("normalize", False)),
            rank=rank,
            scaling=scaling,
            lora=lora,
            target_modules=sorted(lora),
        )

    def _config(self, files: dict[str, bytes]) -> dict:
        config = _json(files, CONFIG_FILE)
        if not isinstance(config, dict):
            raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object")
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise InvalidAdapter(f"peft_type {config.get('peft_type')!r} is not supported; only LORA adapters are served")
        rank = config.get("r")
        if not isinstance(rank, int) or rank < 0 or rank > self.max_rank:
            raise InvalidAdapter(f"LoRA rank r={rank!r} is not supported; it must be an integer from 0 to {self.max_rank}")
        if config.get("use_dora"):
            raise InvalidAdapter("DoRA adapters (use_dora) are not supported")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise InvalidAdapter("LoRA bias terms are not supported (bias must be 'none')")
        return config

    def _meta(self, files: dict[str, bytes]) -> dict:
        if META_FILE not in files:
            return {}
        meta = _json(files, META_FILE)
        if not isinstance(meta, dict):
            raise InvalidAdapter(f"{META_FILE} must be a JSON object")
        if meta.get("head_input", "pooler") not in HEAD_INPUTS:
            raise InvalidAdapter(f"head_input {meta.get('head_input')!r} must be one of {sorted(HEAD_INPUTS)}")
        fingerprint = meta.get("base_fingerprint")
        if fingerprint and fingerprint != self.spec.fingerprint:
            raise BaseModelMismatch(
                f"the adapter was trained on another base model (fingerprint {fingerprint}, this server's is {self.spec.fingerprint})"
            )
        if meta.get("head_input") == "pooler" and "pooler.dense" not in self.spec.linear_shapes:
            raise BaseModelMismatch("the adapter's head reads a BERT pooler, which this base model does not have")
        return meta

    def _head_input(self, meta: dict, head: torch.Tensor | None) -> str:
        """What the head reads. A plain PEFT adapter reads what its task model feeds `classifier`/`score`:
        BERT's pooler, or a decoder's last non-pad token; an encoder without a pooler cannot serve the former."""
        head_input = str(meta.get("head_input", "last_token" if self.spec.is_decoder else "pooler"))
        if head is not None and head_input == "pooler" and "pooler.dense" not in self.spec.linear_shapes:
            raise BaseModelMismatch(
                f"the adapter's head reads a BERT pooler, which this base model ({self.spec.model_type}) does not have"
            )
        return head_input

    def _tensors(self, files: dict[str, bytes]) -> dict[str, torch.Tensor]:
        try:
            raw = load_safetensors(files[WEIGHTS_FILE])
        except Exception as exc:  # safetensors raises several types for corrupt input
            raise InvalidAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
        prefix = self.spec.base_prefix + "."
        out = {}
        for key, tensor in raw.items():
            key = key.removeprefix(_PEFT_PREFIX).replace(".modules_to_save.default", "")
            out[key.removeprefix(prefix) if self.spec.base_prefix else key] = tensor
        return out

    def _lora(self, tensors: dict[str, torch.Tensor], rank: int, config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
        lora = {}
        for module in modules:
            a, b = tensors.pop(f"{module}.lora_A.weight", None), tensors.pop(f"{module}.lora_B.weight", None)
            if a is None or b is None:
                raise InvalidAdapter(f"module {module!r} needs both lora_A.weight and lora_B.weight")
            lora[module] = self._check_pair(module, a, b, rank)
        self._check_targets(config, modules)
        return lora

    def _check_pair(self, module: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if module not in self.spec.linear_shapes:
            raise BaseModelMismatch(f"the adapter targets {module!r}, which this base model ({self.spec.model_type}) does not have")
        fan_in, fan_out = self.spec.linear_shapes[module]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise BaseModelMismatch(
                f"{module}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit this base model "
                f"(expected A({rank}, {fan_in}) B({fan_out}, {rank}))"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidAdapter(f"{module}: LoRA weights contain NaN or infinity")
        return a.float(), b.float()

    def _check_targets(self, config: dict, modules: list[str]) -> None:
        targets = config.get("target_modules") or []
        for module in modules:
            if isinstance(targets, str):
                ok = re.fullmatch(targets, module) is not None
            else:
                ok = any(module == t or module.endswith("." + t) for t in targets)
            if not ok:
                raise InvalidAdapter(f"tensors for {module!r} do not match target_modules {targets!r}")

    def _head(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for module in HEAD_MODULES:
            weight = tensors.pop(f"{module}.weight", None)
            if weight is None:
                continue
            bias = tensors.pop(f"{module}.bias", None)
            if weight.ndim != 2 or weight.shape[1] != self.spec.hidden_size:
                raise BaseModelMismatch(
                    f"head {module}.weight has shape {tuple(weight.shape)}; this base model needs (labels, {self.spec.hidden_size})"
                )
            if not 1 <= weight.shape[0] <= self.max_labels:
                raise InvalidAdapter(f"the head has {weight.shape[0]} labels; the limit is {self.max_labels}")
            bias = torch.zeros(weight.shape[0]) if bias is None else bias
            if tuple(bias.shape) != (weight.shape[0],):
                raise InvalidAdapter(f"head {module}.bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
            return weight.float(), bias.float()
        return None, None

    def _labels(self, files: dict[str, bytes], head: torch.Tensor | None) -> list[str]:
        count = 0 if head is None else head.shape[0]
        if LABELS_FILE not in files:
            return [f"LABEL_{i}" for i in range(count)]
        labels = _json(files, LABELS_FILE)
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels) or len(labels) != count:
            raise InvalidAdapter(f"{LABELS_FILE} must list {count} non-empty label names, one per head output")
        return labels
