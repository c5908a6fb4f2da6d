"""Validate an adapter's files before any weight reaches the model.

Order: file names (safetensors only), adapter_config.json, adaptgate.json, the safetensors header
(names, dtypes and shapes against the base model, before a single tensor is loaded), the tensors'
values, labels. Malformed files are InvalidAdapter; files that are fine but made for another base
model are BaseModelMismatch. A tenant's files are hostile until proven otherwise, so every value
is checked for type and range and nothing a tenant writes can make validation slow: PEFT's regex
form of target_modules is matched by RE2, in time linear in the module name.

Bounds (each well above anything a real adapter needs):
- lora_alpha: a finite number from 0 to MAX_LORA_ALPHA (4096; PEFT's defaults are 8-32, and
  rsLoRA recipes rarely pass 512).
- every weight: finite, |w| <= MAX_WEIGHT_ABS (1e4). Trained LoRA and head weights are orders of
  magnitude smaller; the bound keeps every weight representable in float16 (max 65504).
- dtype: floating point (F16, BF16, F32, F64); integer or boolean weights are a wrong file.
- target_modules: a list of at most MAX_TARGET_MODULES names of at most MAX_TARGET_NAME_CHARS
  characters, or a regex of at most MAX_TARGET_PATTERN_CHARS characters that RE2 compiles within
  RE2_MAX_MEM bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import re2
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
from adaptgate.adapters.safetensors_header import TensorInfo, read_safetensors_header, read_safetensors_header_bytes
from adaptgate.engine.model import ModelSpec
from adaptgate.errors import BaseModelMismatch, InvalidAdapter

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PEFT_PREFIX = "base_model.model."

MAX_LORA_ALPHA = 4096.0
MAX_WEIGHT_ABS = 1e4
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
MAX_TARGET_MODULES = 4096
MAX_TARGET_NAME_CHARS = 256
MAX_TARGET_PATTERN_CHARS = 1024
RE2_MAX_MEM = 1 << 20  # bytes RE2 may spend on one pattern's program and DFA

_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


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
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also a number of thousands of digits
        raise InvalidAdapter(f"{name} is not valid JSON: {exc}") from None


def _show(value: object) -> str:
    """A tenant's value in a message: short, and never a repr of a structure (which could be huge or deep)."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)[:40]
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"a JSON {'list' if isinstance(value, list) else 'object'}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flag(config: dict, key: str, what: str) -> bool:
    """A JSON true/false (or absent/null = false): the string "false" is not false."""
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidAdapter(f"{key} in {what} must be true or false, not {_show(value)}")
    return bool(value)


MAX_ABSTAIN_LABEL_CHARS = 128


def _abstain(meta: dict) -> tuple[float | None, str]:
    """adaptgate.json's optional {"abstain": {"threshold": 0..1, "label": str}}: when Classify abstains."""
    value = meta.get("abstain")
    if value is None:
        return None, ""
    if not isinstance(value, dict):
        raise InvalidAdapter(f"abstain in {META_FILE} must be an object with threshold and label, not {_show(value)}")
    threshold, label = value.get("threshold"), value.get("label")
    if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
        raise InvalidAdapter(f"abstain.threshold in {META_FILE} must be a number from 0 to 1, not {_show(threshold)}")
    if not isinstance(label, str) or not label.strip() or len(label) > MAX_ABSTAIN_LABEL_CHARS:
        raise InvalidAdapter(f"abstain.label in {META_FILE} must be a label of 1 to {MAX_ABSTAIN_LABEL_CHARS} characters, not {_show(label)}")
    return float(threshold), label


def _rank(config: dict, max_rank: int) -> int:
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= max_rank:
        raise InvalidAdapter(f"LoRA rank r={_show(rank)} is not supported; it must be an integer from 0 to {max_rank}")
    return rank


def _alpha(config: dict, rank: int) -> float:
    """PEFT's lora_alpha; absent means alpha = r (scaling 1), null means 0 (the LoRA is switched off)."""
    alpha = config.get("lora_alpha", rank)
    alpha = 0 if alpha is None else alpha
    if not _is_number(alpha) or not math.isfinite(alpha) or not 0 <= alpha <= MAX_LORA_ALPHA:
        raise InvalidAdapter(f"lora_alpha={_show(alpha)} is not supported; it must be a number from 0 to {MAX_LORA_ALPHA:g}")
    return float(alpha)


def _name_matcher(targets: list[object]) -> Callable[[str], bool]:
    """PEFT's list form: a module matches a name exactly or as its last dotted components."""
    if len(targets) > MAX_TARGET_MODULES or not all(isinstance(t, str) and 0 < len(t) <= MAX_TARGET_NAME_CHARS for t in targets):
        raise InvalidAdapter(
            f"target_modules must list at most {MAX_TARGET_MODULES} module names of 1 to {MAX_TARGET_NAME_CHARS} characters"
        )
    names = frozenset(targets)
    return lambda module: module in names or any(module.endswith("." + t) for t in names)


def _regex_matcher(pattern: str) -> Callable[[str], bool]:
    """PEFT's string form: a regex the whole module name must match, run by RE2 (linear time, no backtracking)."""
    if len(pattern) > MAX_TARGET_PATTERN_CHARS:
        raise InvalidAdapter(f"the target_modules regex is {len(pattern)} characters; the limit is {MAX_TARGET_PATTERN_CHARS}")
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except (re2.error, UnicodeError) as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidAdapter(
            f"the target_modules regex cannot be used ({reason}); it must be RE2 syntax (no backreferences or lookaround)"
        ) from None
    return lambda module: compiled.fullmatch(module) is not None


def _target_matcher(config: dict) -> Callable[[str], bool]:
    targets = config.get("target_modules")
    if targets is None:
        return lambda module: False
    if isinstance(targets, str):
        return _regex_matcher(targets)
    if isinstance(targets, list):
        return _name_matcher(targets)
    raise InvalidAdapter(f"target_modules must be a list of module names or a regex string, not {type(targets).__name__}")


@dataclass(frozen=True)
class LoraSettings:
    """adapter_config.json's numbers, checked: what the weights are scaled by and which modules they may touch."""

    rank: int
    scaling: float
    targets: Callable[[str], bool]
    targets_text: str


def _check_values(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Finite and bounded weights, as float32: anything else would turn a tenant's logits into NaN or inf."""
    tensor = tensor.float()
    if tensor.numel() == 0:
        return tensor
    if not torch.isfinite(tensor).all():
        raise InvalidAdapter(f"{name} contains NaN or infinity")
    peak = float(tensor.abs().max())
    if peak > MAX_WEIGHT_ABS:
        raise InvalidAdapter(f"{name} holds a weight of magnitude {peak:.3g}; weights must be at most {MAX_WEIGHT_ABS:g} in absolute value")
    return tensor


class AdapterValidator:
    def __init__(self, spec: ModelSpec, max_rank: int, max_labels: int) -> None:
        self.spec = spec
        self.max_rank = max_rank
        self.max_labels = max_labels

    def parse(self, files: dict[str, bytes]) -> AdapterWeights:
        check_filenames(list(files))
        settings = self._config(files)
        meta = self._meta(files)
        self._check_header(read_safetensors_header_bytes(files[WEIGHTS_FILE]))
        tensors = self._tensors(files)
        lora = self._lora(tensors, settings)
        head_w, head_b = self._head(tensors)
        if tensors:
            raise InvalidAdapter(f"unexpected tensors in {WEIGHTS_FILE}: {', '.join(sorted(tensors)[:5])}")
        if not lora and head_w is None:
            raise InvalidAdapter("the adapter has neither LoRA weights nor a task head")
        labels = self._labels(files, head_w)
        threshold, abstain_label = _abstain(meta) if head_w is not None else (None, "")
        return AdapterWeights(
            labels=labels,
            head_weight=head_w,
            head_bias=head_b,
            head_input=self._head_input(meta, head_w),
            normalize_head_input=_flag(meta, "normalize", META_FILE),
            rank=settings.rank,
            scaling=settings.scaling,
            lora=lora,
            target_modules=sorted(lora),
            abstain_threshold=threshold,
            abstain_label=abstain_label,
        )

    def check_weights_header(self, path: Path) -> None:
        """Judge a weights file on disk by its header alone (names, dtypes, shapes, offsets), reading no tensor.

        An upload streamed to a file can be refused here before its bytes are read into memory.
        """
        self._check_header(read_safetensors_header(path))

    def _config(self, files: dict[str, bytes]) -> LoraSettings:
        config = _json(files, CONFIG_FILE)
        if not isinstance(config, dict):
            raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object")
        peft_type = config.get("peft_type")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise InvalidAdapter(f"peft_type {_show(peft_type)} is not supported; only LORA adapters are served")
        rank = _rank(config, self.max_rank)
        if _flag(config, "use_dora", CONFIG_FILE):
            raise InvalidAdapter("DoRA adapters (use_dora) are not supported")
        if config.get("bias", "none") != "none" or _flag(config, "lora_bias", CONFIG_FILE):
            raise InvalidAdapter("LoRA bias terms are not supported (bias must be 'none')")
        alpha = _alpha(config, rank)
        rslora = _flag(config, "use_rslora", CONFIG_FILE)
        scaling = (alpha / math.sqrt(rank) if rslora else alpha / rank) if rank else 0.0
        return LoraSettings(rank, scaling, _target_matcher(config), _show(config.get("target_modules")))

    def _meta(self, files: dict[str, bytes]) -> dict:
        if META_FILE not in files:
            return {}
        meta = _json(files, META_FILE)
        if not isinstance(meta, dict):
            raise InvalidAdapter(f"{META_FILE} must be a JSON object")
        head_input = meta.get("head_input", "pooler")
        if not isinstance(head_input, str) or head_input not in HEAD_INPUTS:
            raise InvalidAdapter(f"head_input {_show(head_input)} must be one of {sorted(HEAD_INPUTS)}")
        _flag(meta, "normalize", META_FILE)
        _abstain(meta)
        fingerprint = meta.get("base_fingerprint")
        if fingerprint and fingerprint != self.spec.fingerprint:
            raise BaseModelMismatch(
                f"the adapter was trained on another base model (fingerprint {_show(fingerprint)}, this server's is {self.spec.fingerprint})"
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

    def _key(self, name: str) -> str:
        """A tensor's name as the base model knows it: PEFT's wrapper and task-model prefixes removed."""
        key = name.removeprefix(_PEFT_PREFIX).replace(".modules_to_save.default", "")
        return key.removeprefix(self.spec.base_prefix + ".") if self.spec.base_prefix else key

    # -- the header: judged before any tensor is materialised -------------------------------------

    def _check_header(self, infos: dict[str, TensorInfo]) -> None:
        seen: dict[str, str] = {}
        for name, info in infos.items():
            key = self._key(name)
            if key in seen:
                raise InvalidAdapter(f"tensors {seen[key]!r:.120} and {name!r:.120} name the same weight {key!r:.120}")
            seen[key] = name
            if info.dtype not in FLOAT_DTYPES:
                raise InvalidAdapter(
                    f"tensor {name!r:.120} has dtype {info.dtype}; adapter weights must be floating point "
                    f"({', '.join(sorted(FLOAT_DTYPES))})"
                )
            self._header_check(key)(key, info)

    def _header_check(self, key: str) -> Callable[[str, TensorInfo], None]:
        """Which rule a tensor name falls under; a name under none is not part of an adapter."""
        if key.endswith(_LORA_A):
            return self._check_lora_a
        if key.endswith(_LORA_B):
            return self._check_lora_b
        if key in {f"{m}.weight" for m in HEAD_MODULES}:
            return self._check_head_weight
        if key in {f"{m}.bias" for m in HEAD_MODULES}:
            return self._check_head_bias
        return _unexpected_tensor

    def _module_shape(self, key: str, suffix: str) -> tuple[str, int, int]:
        module = key.removesuffix(suffix)
        if module not in self.spec.linear_shapes:
            raise BaseModelMismatch(f"the adapter targets {module!r:.120}, which this base model ({self.spec.model_type}) does not have")
        fan_in, fan_out = self.spec.linear_shapes[module]
        return module, fan_in, fan_out

    def _shape_mismatch(self, module: str, info: TensorInfo, fan_in: int, fan_out: int) -> BaseModelMismatch:
        return BaseModelMismatch(
            f"{module}: LoRA shapes such as {info.name.rsplit('.', 2)[-2]}{list(info.shape)} do not fit this base model "
            f"(expected A(r, {fan_in}) B({fan_out}, r))"
        )

    def _check_rank(self, module: str, rank: int) -> None:
        if rank > self.max_rank:
            raise InvalidAdapter(f"{module}: LoRA rank {rank} is not supported; this server's limit is {self.max_rank}")

    def _check_lora_a(self, key: str, info: TensorInfo) -> None:
        module, fan_in, fan_out = self._module_shape(key, _LORA_A)
        if len(info.shape) != 2 or info.shape[1] != fan_in:
            raise self._shape_mismatch(module, info, fan_in, fan_out)
        self._check_rank(module, info.shape[0])

    def _check_lora_b(self, key: str, info: TensorInfo) -> None:
        module, fan_in, fan_out = self._module_shape(key, _LORA_B)
        if len(info.shape) != 2 or info.shape[0] != fan_out:
            raise self._shape_mismatch(module, info, fan_in, fan_out)
        self._check_rank(module, info.shape[1])

    def _check_head_weight(self, key: str, info: TensorInfo) -> None:
        if len(info.shape) != 2 or info.shape[1] != self.spec.hidden_size:
            raise BaseModelMismatch(f"head {key} has shape {list(info.shape)}; this base model needs (labels, {self.spec.hidden_size})")
        if not 1 <= info.shape[0] <= self.max_labels:
            raise InvalidAdapter(f"the head has {info.shape[0]} labels; the limit is {self.max_labels}")

    def _check_head_bias(self, key: str, info: TensorInfo) -> None:
        if len(info.shape) != 1 or not 1 <= info.shape[0] <= self.max_labels:
            raise InvalidAdapter(f"head {key} has shape {list(info.shape)}; it must be (labels,) with at most {self.max_labels} labels")

    # -- the tensors ---------------------------------------------------------------------------

    def _tensors(self, files: dict[str, bytes]) -> dict[str, torch.Tensor]:
        try:
            raw = load_safetensors(files[WEIGHTS_FILE])
        except Exception as exc:  # safetensors raises several types for corrupt input
            raise InvalidAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
        return {self._key(name): tensor for name, tensor in raw.items()}

    def _lora(self, tensors: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        modules = sorted({k.removesuffix(_LORA_A).removesuffix(_LORA_B) for k in tensors if k.endswith((_LORA_A, _LORA_B))})
        lora = {}
        for module in modules:
            a, b = tensors.pop(module + _LORA_A, None), tensors.pop(module + _LORA_B, None)
            if a is None or b is None:
                raise InvalidAdapter(f"module {module!r} needs both lora_A.weight and lora_B.weight")
            lora[module] = self._check_pair(module, a, b, settings.rank)
            if not settings.targets(module):
                raise InvalidAdapter(f"tensors for {module!r} do not match target_modules {settings.targets_text}")
        return lora

    def _check_pair(self, module: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        fan_in, fan_out = self.spec.linear_shapes[module]  # the header check refused unknown modules
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise BaseModelMismatch(
                f"{module}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit this base model "
                f"(expected A({rank}, {fan_in}) B({fan_out}, {rank}))"
            )
        return _check_values(f"{module}.lora_A.weight", a), _check_values(f"{module}.lora_B.weight", b)

    def _head(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for module in HEAD_MODULES:
            weight = tensors.pop(f"{module}.weight", None)
            if weight is None:
                continue
            bias = tensors.pop(f"{module}.bias", None)
            bias = torch.zeros(weight.shape[0]) if bias is None else bias
            if tuple(bias.shape) != (weight.shape[0],):
                raise InvalidAdapter(f"head {module}.bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
            return _check_values(f"head {module}.weight", weight), _check_values(f"head {module}.bias", bias)
        return None, None

    def _labels(self, files: dict[str, bytes], head: torch.Tensor | None) -> list[str]:
        count = 0 if head is None else head.shape[0]
        if LABELS_FILE not in files:
            return [f"LABEL_{i}" for i in range(count)]
        labels = _json(files, LABELS_FILE)
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels) or len(labels) != count:
            raise InvalidAdapter(f"{LABELS_FILE} must list {count} non-empty label names, one per head output")
        return labels


def _unexpected_tensor(key: str, info: TensorInfo) -> None:
    raise InvalidAdapter(f"unexpected tensor {info.name!r:.120} in {WEIGHTS_FILE}; an adapter holds LoRA A/B weights and a task head")
