"""The `embed` method: contrastive LoRA that tunes the tenant's embeddings, served through `Embed`.

Same machinery as `lora` (split, LoRA on the upper blocks, checkpoints, resume, divergence
checks), but no head: each step pairs every row of the batch with another training row of the
same label and minimises a symmetric in-batch InfoNCE loss over normalized mean-pooled
embeddings (temperature 0.05) — the positive is the partner, the negatives are the other
partners of *other* labels (same-label partners are masked out, not pushed away).

Evaluation is a nearest-centroid classifier: class centroids from up to CENTROID_ROWS training
rows, validation rows scored by cosine similarity / temperature, reported as loss, accuracy,
macro-F1 and (at the end) a confusion matrix, so the job's numbers read like a classifier's.
The published adapter holds LoRA weights only: `Embed` with `adapter` applies them, and
`Classify` refuses it (FAILED_PRECONDITION: no task head). It pools as training did: mean over
tokens, normalized (the Embed defaults).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaptgate.adapters.format import lora_files
from adaptgate.training.methods.evaluation import Scores, score
from adaptgate.training.methods.lora import LoraOutcome, LoraParams, _Trainer, check_rank, lora_params
from adaptgate.training.methods.lora_data import eval_batches, pad
from adaptgate.training.methods.method import Method
from adaptgate.training.runners.updates import Report

TEMPERATURE = 0.05
CENTROID_ROWS = 1000


@dataclass(frozen=True)
class EmbedParams(LoraParams):
    normalize: bool = True  # Embed's default, and what the contrastive loss needs


@dataclass(kw_only=True)
class EmbedResult(LoraOutcome):
    """An `embed` job: LoRA only, no head; `pooling` is how the tuned vectors are read."""

    pooling: str


class _EmbedTrainer(_Trainer):
    WHAT = "contrastive LoRA embeddings"
    TRAIN_HEAD = False

    def __init__(self, texts: list[str], labels: list[str], model_dir: str, params: EmbedParams, report: Report) -> None:
        super().__init__(texts, labels, model_dir, params, report)
        self.by_label: dict[int, list[int]] = {}
        for i in self.train_idx:
            self.by_label.setdefault(int(self.y[i]), []).append(i)
        rng = random.Random(params.seed)
        self.reference = sorted(rng.sample(self.train_idx, min(CENTROID_ROWS, len(self.train_idx))))

    def _chance_loss(self) -> float:
        """InfoNCE of a model that cannot tell rows apart: ln(batch)."""
        return math.log(max(2, self.batch))

    def _partners(self, rows: list[int]) -> list[int]:
        """A same-label training row for each row, other than itself when the label has one; deterministic per step."""
        rng = random.Random(f"{self.params.seed}:{self.epoch}:{self.position}")
        partners = []
        for i in rows:
            pool = self.by_label[int(self.y[i])]
            choice = rng.choice(pool)
            while choice == i and len(pool) > 1:
                choice = rng.choice(pool)
            partners.append(choice)
        return partners

    def _train_step(self, rows: list[int]) -> float:
        partners = self._partners(rows)
        ids, mask = pad([self.ids[i] for i in rows + partners], self.model.pad_id, self.base.device)
        vectors = self.model.features(ids, mask)  # normalized fp32
        anchors, positives = vectors[: len(rows)], vectors[len(rows) :]
        labels = self.y[rows].to(vectors.device)
        other = self.y[partners].to(vectors.device)
        same = labels.unsqueeze(1) == other.unsqueeze(0)
        same.fill_diagonal_(False)  # the partner itself is the positive
        logits = (anchors @ positives.t() / TEMPERATURE).masked_fill(same, float("-inf"))
        target = torch.arange(len(rows), device=vectors.device)
        return self._descend((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)

    @torch.inference_mode()
    def _embed(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        order, parts = [], []
        for batch in eval_batches(rows, self.lengths, 128):
            ids, mask = pad([self.ids[i] for i in batch], self.model.pad_id, self.base.device)
            parts.append(self.model.features(ids, mask).float().cpu())
            order += batch
        return order, torch.cat(parts)

    @torch.inference_mode()
    def evaluate(self, rows: list[int]) -> Scores:
        ref_order, ref = self._embed(self.reference)
        ref_y = self.y[ref_order]
        centroids = torch.zeros(len(self.names), ref.shape[1])
        centroids.index_add_(0, ref_y, ref)
        centroids = F.normalize(centroids, dim=-1)
        order, vectors = self._embed(rows)
        return score(vectors @ centroids.t() / TEMPERATURE, self.y[order], self.step, len(self.names))

    def _result(self, final: Scores) -> EmbedResult:  # type: ignore[override]
        return EmbedResult(
            lora=self.model.lora_weights(), rank=self.model.rank, alpha=self.model.alpha, labels=self.names,
            metrics=final.metrics, fingerprint=self.base.spec.fingerprint, base_prefix=self.base.spec.base_prefix,
            pooling=self.model.head_input, normalize=self.model.normalize, confusion=final.confusion,
            steps=self.step, resumed_from=self.resumed_from,
        )


def train_embed(texts: list[str], labels: list[str], model_dir: str, params: EmbedParams, report: Report) -> EmbedResult:
    torch.manual_seed(params.seed)
    return _EmbedTrainer(texts, labels, model_dir, params, report).run()  # type: ignore[return-value]


def embed_files(result: EmbedResult, source: str) -> dict[str, bytes]:
    """LoRA weights only (no head): `Embed` applies them and pools as training did; `Classify` refuses them."""
    return lora_files(
        result.lora, result.rank, result.alpha, None, None, result.labels, result.fingerprint, source,
        base_prefix=result.base_prefix, head_input=result.pooling, normalize=result.normalize,
    )


METHOD = Method("embed", EmbedParams, lora_params(EmbedParams), train_embed, embed_files, check=check_rank, resumable=True)
