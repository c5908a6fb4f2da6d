"""Task heads of all engine slots, with very different label counts in one batch.

A head is stored in a size class (8, 32, 128, 512, 2048 labels, capped at max_labels), each class
its own [entries, hidden, capacity] tensor that grows as heads of that size arrive. So a slot pays
for its own head's size class, not for the largest head the engine allows: 63 two-label heads next
to one 1,000-label head hold one large entry, not 64. Weights are fp32 (heads are tiny and scores
should not be rounded); label columns past a head's own get -inf logits so softmax ignores them.

Scoring gathers each small class's weights per (row, head) pair for one bmm; a large class is
scored per distinct head (few large heads share a batch, and gathering their weights per row would
copy megabytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptgate.engine.pooling import Pooling

# "pooler" (BERT's pooler output) is 0; every pooling is a head input too, by its value, numbered in
# the enum's order (mean 1, cls 2, last_token 3, ...): training defaults a head to the model's own pooling.
HEAD_INPUT_CODES = {"pooler": 0} | {p.value: code for code, p in enumerate(Pooling, start=1)}
HEAD_INPUT_POOLING = {code: p for code, p in enumerate(Pooling, start=1)}

SIZE_CLASSES = (8, 32, 128, 512, 2048)
# From this capacity on, a class is scored head by head instead of gathering weights per row.
PER_HEAD_FROM = 512


def size_classes(max_labels: int) -> tuple[int, ...]:
    """The capacities in use: those under max_labels, then max_labels itself (beyond 2048: 2048, 4x...)."""
    caps = [c for c in SIZE_CLASSES if c < max_labels]
    while caps and caps[-1] * 4 < max_labels:
        caps.append(caps[-1] * 4)
    return (*caps, max_labels)


@dataclass
class _SizeClass:
    """Heads of up to `capacity` labels; entries are reused after a clear and doubled when full."""

    capacity: int
    hidden: int
    device: torch.device
    weight: torch.Tensor = field(init=False)  # [entries, hidden, capacity]
    bias: torch.Tensor = field(init=False)  # [entries, capacity]
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.weight = torch.zeros(0, self.hidden, self.capacity, device=self.device)
        self.bias = torch.zeros(0, self.capacity, device=self.device)

    def take(self, limit: int) -> int:
        if not self.free:
            self._grow(limit)
        return self.free.pop(0)

    def _grow(self, limit: int) -> None:
        old = self.weight.shape[0]
        new = min(max(1, 2 * old), limit)
        self.weight = torch.cat([self.weight, self.weight.new_zeros(new - old, self.hidden, self.capacity)])
        self.bias = torch.cat([self.bias, self.bias.new_zeros(new - old, self.capacity)])
        self.free.extend(range(old, new))

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.bias.numel() * self.bias.element_size()


class HeadPool:
    def __init__(self, n_slots: int, hidden: int, max_labels: int, device: torch.device) -> None:
        self.classes = [_SizeClass(cap, hidden, device) for cap in size_classes(max_labels)]
        self.n_slots = n_slots
        self.max_labels = max_labels
        self.entry: list[tuple[int, int] | None] = [None] * n_slots  # slot -> (size class, entry in it)
        self.num_labels = [0] * n_slots
        self.input_code = [0] * n_slots
        self.normalize_input = [False] * n_slots

    def install(self, slot: int, weight: torch.Tensor, bias: torch.Tensor, head_input: str, normalize: bool) -> None:
        """weight: [num_labels, hidden] as nn.Linear stores it."""
        labels = weight.shape[0]
        if not 0 < labels <= self.max_labels:
            raise ValueError(f"a head has {labels} labels; this engine holds 1 to {self.max_labels}")
        self.clear(slot)
        c = next(i for i, size in enumerate(self.classes) if labels <= size.capacity)
        size = self.classes[c]
        index = size.take(self.n_slots)
        size.weight[index].zero_()
        size.bias[index].zero_()
        size.weight[index, :, :labels] = weight.t().float()
        size.bias[index, :labels] = bias.float()
        self.entry[slot] = (c, index)
        self.num_labels[slot] = labels
        self.input_code[slot] = HEAD_INPUT_CODES[head_input]
        self.normalize_input[slot] = normalize

    def clear(self, slot: int) -> None:
        held = self.entry[slot]
        if held is not None:
            self.classes[held[0]].free.append(held[1])
        self.entry[slot] = None
        self.num_labels[slot] = 0

    def reads_pooler(self, slot: int) -> bool:
        return self.input_code[slot] == HEAD_INPUT_CODES["pooler"]

    def nbytes(self) -> int:
        """Memory the heads hold (every size class, free entries included)."""
        return sum(c.nbytes() for c in self.classes)

    def _held(self, slot: int) -> tuple[int, int]:
        held = self.entry[slot]
        if held is None:
            raise ValueError(f"slot {slot} holds no head")
        return held

    def probabilities(self, features: torch.Tensor, slots: list[int]) -> list[torch.Tensor]:
        """features [pairs, hidden] fp32, one slot per pair -> each pair's probabilities over its
        head's own labels, on the CPU."""
        out: list[torch.Tensor] = [features.new_empty(0)] * len(slots)
        groups: dict[int, list[int]] = {}
        for j, slot in enumerate(slots):
            groups.setdefault(self._held(slot)[0], []).append(j)
        for c, pairs in groups.items():
            size = self.classes[c]
            entries = [self._held(slots[j])[1] for j in pairs]
            score = _per_head if size.capacity >= PER_HEAD_FROM else _gathered
            logits = score(size, features[pairs], entries)
            labels = torch.tensor([self.num_labels[slots[j]] for j in pairs], device=logits.device)
            valid = torch.arange(size.capacity, device=logits.device).unsqueeze(0) < labels.unsqueeze(1)
            probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).cpu()
            for k, j in enumerate(pairs):
                out[j] = probs[k, : self.num_labels[slots[j]]]
        return out


def _gathered(size: _SizeClass, features: torch.Tensor, entries: list[int]) -> torch.Tensor:
    """[m, hidden] x each row's own head -> [m, capacity] in one bmm over gathered weights."""
    index = torch.tensor(entries, device=features.device)
    return torch.bmm(features.unsqueeze(1), size.weight[index]).squeeze(1) + size.bias[index]


def _per_head(size: _SizeClass, features: torch.Tensor, entries: list[int]) -> torch.Tensor:
    """The same, one matmul per distinct head: no weight is copied."""
    logits = features.new_empty(len(entries), size.capacity)
    for entry in set(entries):
        rows = [k for k, e in enumerate(entries) if e == entry]
        logits[rows] = torch.addmm(size.bias[entry], features[rows], size.weight[entry])
    return logits
