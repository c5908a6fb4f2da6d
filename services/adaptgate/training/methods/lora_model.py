"""The model a `lora` job trains: the frozen base with PEFT LoRA on its upper blocks, plus a new head.

The head reads exactly what the engine feeds a served head (`engine/forward.py`): mean-pooled
last hidden states over the attention mask, accumulated in fp32 (or the last real token on
decoders, or BERT's pooler), optionally L2-normalized, then one fp32 linear layer. So the
probabilities the trained model computes are the ones `Classify` serves for the published adapter.

The base keeps the dtype serving uses (bf16 on CPUs with AMX/avx512_bf16, on GPUs); the LoRA
and head parameters are fp32 master weights, and the forward runs under bf16 autocast, so the
big matmuls run in bf16 and the optimizer updates stay exact. Blocks below the first target
have no trainable parameter, so autograd records nothing there: the backward pass stops at the
first adapted block, which is what freezing the early layers buys in time.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adaptgate.engine.model import BaseModel, ModelSpec
from adaptgate.engine.pooling import Pooling, pool, without_pad_tokens

ADAPTER = "default"
# The block index in module names: BERT `encoder.layer.3.`, GPT-2 `h.3.`, Llama/Qwen `layers.3.`.
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def block_of(module: str) -> int | None:
    match = _BLOCK.search(module)
    return int(match[1]) if match else None


def block_count(spec: ModelSpec) -> int:
    blocks = [b for name in spec.linear_shapes if (b := block_of(name)) is not None]
    return max(blocks) + 1 if blocks else 0


def default_first_block(spec: ModelSpec) -> int:
    """Freeze the lower third of the blocks: they hold the general features a small task should not move."""
    return block_count(spec) // 3


def select_targets(spec: ModelSpec, first_block: int, kinds: tuple[str, ...] = ()) -> list[str]:
    """Linear modules inside blocks >= first_block; `kinds` (name suffixes like "query") narrow them, () = all."""
    names = [n for n in spec.linear_shapes if (b := block_of(n)) is not None and b >= first_block]
    if kinds:
        names = [n for n in names if any(n == k or n.endswith("." + k) for k in kinds)]
    return sorted(names, key=lambda n: (block_of(n), n))


class LoraClassifier(nn.Module):
    """Wraps `base.model` in place (PEFT LoRA layers are injected into it)."""

    def __init__(
        self, base: BaseModel, num_labels: int, targets: list[str], rank: int, alpha: float,
        head_input: str, normalize: bool, dropout: float = 0.0,
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # imported here: the gateway never needs it

        super().__init__()
        if not targets:
            raise ValueError("no LoRA target modules were selected")
        self.base = base
        self.targets = list(targets)
        self.rank, self.alpha = rank, float(alpha)
        self.head_input, self.normalize = head_input, normalize
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=self.targets, lora_dropout=dropout, bias="none")
        self.encoder = inject_adapter_in_model(config, base.model, adapter_name=ADAPTER)
        for name, param in self.encoder.named_parameters():
            if ".lora_" in name:
                param.data = param.data.float()  # fp32 master weights next to a bf16 base
                param.requires_grad_(True)
            else:
                param.requires_grad_(False)
        self.head = nn.Linear(base.spec.hidden_size, num_labels, device=base.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.pad_id = int(base.tokenizer.pad_token_id or 0)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.base.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.base.device.type, dtype=self.base.dtype)
        return contextlib.nullcontext()

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the head reads, fp32 [B, H]: the same computation as the engine's `_head_features`."""
        with self.autocast():
            out = self.encoder(input_ids=ids, attention_mask=mask)
        if self.head_input == "pooler":
            feats = out.pooler_output.float()
        elif self.head_input == "last_token":
            feats = pool(out.last_hidden_state, without_pad_tokens(mask, ids, self.pad_id), Pooling.LAST_TOKEN)
        else:
            feats = pool(out.last_hidden_state, mask, Pooling(self.head_input))
        return F.normalize(feats, p=2.0, dim=-1) if self.normalize else feats

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids, mask))

    # ----- the trained weights ----------------------------------------------------------------

    def lora_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name in self.targets:
            yield name, self.encoder.get_submodule(name)

    def lora_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name (relative to the base model) -> (A [r, in], B [out, r]) fp32, as PEFT saves them."""
        return {
            name: (module.lora_A[ADAPTER].weight.detach().float().clone(), module.lora_B[ADAPTER].weight.detach().float().clone())
            for name, module in self.lora_modules()
        }

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable().items()}

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        missing = set(params) - set(tensors)
        if missing:
            raise KeyError(f"snapshot lacks {sorted(missing)[:3]}")
        for name, param in params.items():
            param.copy_(tensors[name])

    def blocks(self) -> dict[int, list[str]]:
        """Trainable parameter names grouped by block; the head is block -1."""
        groups: dict[int, list[str]] = {}
        for name in self.trainable():
            block = block_of(name.removeprefix("encoder."))
            groups.setdefault(-1 if block is None else block, []).append(name)
        return groups
