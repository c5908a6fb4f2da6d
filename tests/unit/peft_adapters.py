"""Build adapters with plain PEFT, the way a tenant would, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification


def make_peft_adapter(base_dir: Path, out: Path, num_labels: int, rank: int, seed: int, targets: list[str] | None = None):
    """A SEQ_CLS LoRA adapter with random (non-zero) A and B and a random head; returns the PEFT model too."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    config = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, init_lora_weights=False,
        target_modules=targets or ["query", "key", "value", "dense"],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.eval()
    peft_model.save_pretrained(out)
    (out / "labels.json").write_text(json.dumps([f"class-{i}" for i in range(num_labels)]))
    return peft_model


def adapter_files(directory: Path) -> dict[str, bytes]:
    keep = ("adapter_config.json", "adapter_model.safetensors", "labels.json", "adaptgate.json")
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name in keep}


def make_decoder_peft_adapter(
    base_dir: Path,
    out: Path,
    num_labels: int,
    rank: int,
    seed: int,
    targets: list[str],
    fan_in_fan_out: bool = False,
    head_std: float = 0.3,
):
    """A SEQ_CLS LoRA adapter on a decoder-only base (`*ForSequenceClassification` with a `score` head).

    The base config must carry pad_token_id: without it transformers cannot find each row's last
    non-pad token in a padded batch. GPT-2's Conv1D targets need fan_in_fan_out=True, as PEFT asks.
    The head is redrawn wider than its 0.02 init so that probabilities are far from uniform.
    """
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    if model.config.pad_token_id is None:
        raise ValueError(f"{base_dir}: set pad_token_id in the base config")
    config = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, init_lora_weights=False,
        target_modules=targets, fan_in_fan_out=fan_in_fan_out,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
            elif "score.modules_to_save" in name:
                param.normal_(0, head_std)
    peft_model.eval()
    peft_model.save_pretrained(out)
    (out / "labels.json").write_text(json.dumps([f"class-{i}" for i in range(num_labels)]))
    return peft_model
