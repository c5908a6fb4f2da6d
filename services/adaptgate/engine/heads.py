"""Task heads of all engine slots in one gathered matmul, with different label counts per row.

Weights live as [slots, hidden, max_labels] (fp32: heads are tiny and scores should not be
rounded); unused label columns get -inf logits so softmax ignores them.
"""

from __future__ import annotations

import torch

from adaptgate.engine.pooling import Pooling

# "pooler" (BERT's pooler output) is 0; every pooling is a head input too, by its value, numbered in
# the enum's order (mean 1, cls 2, last_token 3, ...): training defaults a head to the model's own pooling.
HEAD_INPUT_CODES = {"pooler": 0} | {p.value: code for code, p in enumerate(Pooling, start=1)}
HEAD_INPUT_POOLING = {code: p for code, p in enumerate(Pooling, start=1)}


class HeadPool:
    def __init__(self, n_slots: int, hidden: int, max_labels: int, device: torch.device) -> None:
        self.weight = torch.zeros(n_slots, hidden, max_labels, device=device)
        self.bias = torch.zeros(n_slots, max_labels, device=device)
        self.num_labels = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.input_code = [0] * n_slots
        self.normalize_input = [False] * n_slots
        self.max_labels = max_labels

    def install(self, slot: int, weight: torch.Tensor, bias: torch.Tensor, head_input: str, normalize: bool) -> None:
        """weight: [num_labels, hidden] as nn.Linear stores it."""
        labels = weight.shape[0]
        self.weight[slot].zero_()
        self.bias[slot].zero_()
        self.weight[slot, :, :labels] = weight.t().float()
        self.bias[slot, :labels] = bias.float()
        self.num_labels[slot] = labels
        self.input_code[slot] = HEAD_INPUT_CODES[head_input]
        self.normalize_input[slot] = normalize

    def clear(self, slot: int) -> None:
        self.num_labels[slot] = 0

    def reads_pooler(self, slot: int) -> bool:
        return self.input_code[slot] == HEAD_INPUT_CODES["pooler"]

    def probabilities(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """features [n, hidden] fp32, slots [n] -> probabilities [n, max_labels] (0 beyond each head's labels)."""
        logits = torch.bmm(features.unsqueeze(1), self.weight[slots]).squeeze(1) + self.bias[slots]
        columns = torch.arange(self.max_labels, device=logits.device)
        valid = columns.unsqueeze(0) < self.num_labels[slots].unsqueeze(1)
        return torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
