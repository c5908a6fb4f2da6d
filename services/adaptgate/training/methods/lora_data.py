"""Token ids and batches for the `lora` method: tokenize once, batch by length, pad per batch.

Texts are tokenized once up front (fast tokenizers do 20k short texts in about a second) and
truncated to `max_tokens`. Batches are "length-grouped": shuffle, cut into mega-batches of
MEGA_BATCHES batches, sort each by length, cut into batches, shuffle the batches. Padding then
costs little while every epoch still sees a fresh random order. The order is a pure function
of (seed, epoch), so a job resumed from a checkpoint replays the same batches from where it stopped.
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

MEGA_BATCHES = 50


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text (special tokens included), each at most `max_tokens` long."""
    encoded = tokenizer(texts, truncation=True, max_length=max_tokens)
    return [list(ids) for ids in encoded["input_ids"]]


def pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T], T the longest row (as the engine pads)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def epoch_batches(indices: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped random batches of `indices` for one epoch; deterministic in (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(indices)
    rng.shuffle(order)
    mega = batch_size * MEGA_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Batches per epoch as epoch_batches cuts them (the last batch of each mega-batch may be short)."""
    mega = batch_size * MEGA_BATCHES
    full, rest = divmod(rows, mega)
    return full * MEGA_BATCHES + -(-rest // batch_size)


def eval_batches(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches sorted by length (order does not matter for metrics, padding does)."""
    ordered = sorted(indices, key=lambda i: lengths[i])
    return [ordered[j : j + batch_size] for j in range(0, len(ordered), batch_size)]
