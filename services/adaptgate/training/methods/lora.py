"""The `lora` method (and `auto` when it picks LoRA): LoRA on the upper blocks plus a new task head.

Runs inside a Ray worker. The recipe, measured on SST-2 with MiniLM on the 2-core CPU (see
TRAINING.md): rank 16 on every linear layer of the upper two thirds of the blocks, the lower
third frozen, the base in bf16 with fp32 LoRA/head weights under autocast, AdamW at lr 1e-3 for
LoRA and 10x that for the zero-initialised head, linear warm-up then linear decay, batch 32,
at most 64 tokens, length-grouped batches, no dropout (it cost 16% of step time for no gain).

Every job: a deterministic stratified train/validation split, evaluation every ~1/8 of the run
on up to `max_eval_rows` validation rows (loss, accuracy, macro-F1), the best evaluation's
weights kept (by macro-F1, then loss) and evaluated once more on the whole validation split with
a confusion matrix, progress and ETA updates, a checkpoint after every evaluation (so a killed
worker resumes there), and a clear failure when the loss stops being finite or explodes.
With `auto`: per-block learning rates from each block's HTSR alpha (htsr.py), recomputed every
epoch with the optimizer state kept, and early stopping after `patience` evaluations without
improvement.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from adaptgate.adapters.format import lora_files
from adaptgate.engine.model import BaseModel
from adaptgate.errors import InvalidArgument
from adaptgate.training.data.splits import job_split
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.records import JobSpec
from adaptgate.training.methods.evaluation import Scores, describe_confusion, score
from adaptgate.training.methods.head import label_order
from adaptgate.training.methods.head_fit import TrainingDiverged
from adaptgate.training.methods.htsr import BlockRate, describe, hill_alpha, multipliers
from adaptgate.training.methods.lora_data import epoch_batches, eval_batches, pad, steps_per_epoch, tokenize
from adaptgate.training.methods.lora_model import LoraClassifier, block_count, block_of, default_first_block, select_targets
from adaptgate.training.methods.method import Context, Method, SpecParams
from adaptgate.training.runners.checkpoints import CheckpointDir, load_optimizer, optimizer_tensors, signature
from adaptgate.training.runners.updates import Report, make_update
from adaptgate.training.runners.worker_base import load_training_base
from adaptgate.training.tracking import TrackingSpec

__all__ = ["METHOD", "LoraParams", "LoraResult", "TrainingDiverged", "train_lora"]

DEFAULT_LEARNING_RATE = 1e-3
HEAD_LR_SCALE = 10.0
DEFAULT_RANK = 16
DEFAULT_BATCH = 32
DEFAULT_MAX_TOKENS = 64
TARGET_STEPS = 1500  # default epochs: enough passes for about this many steps ...
MAX_DEFAULT_EPOCHS = 20  # ... but no more passes than this
EVALS_PER_RUN = 8
MIN_EVAL_EVERY = 10
PROGRESS_UPDATES = 50
WARMUP_FRACTION = 0.06
DEFAULT_PATIENCE = 3
EVAL_BATCH = 128
WEIGHT_DECAY = 0.01
EXPLODED = 25.0  # mean training loss over EXPLODED_WINDOW steps above this x ln(labels): diverged
EXPLODED_WINDOW = 20
LOADED, TRAINED = 0.03, 0.97  # progress milestones


@dataclass(frozen=True)
class LoraParams(SpecParams):
    """Zero / empty means "the default" everywhere, so a bare SubmitJob gets the measured recipe."""

    batch_size: int = 0
    rank: int = 0
    alpha: float = 0.0  # LoRA alpha; 0 = 2 x rank
    first_block: int = -1  # blocks below are frozen; -1 = the lower third
    target_kinds: tuple[str, ...] = ()  # module-name suffixes ("query", "value"); () = every linear layer
    max_tokens: int = 0
    max_steps: int = 0
    eval_every: int = 0
    holdout_from: int = 0  # rows from here on are the tenant's validation dataset (0: split off validation_fraction)
    max_eval_rows: int = 1000
    head_input: str = ""  # "" = the model's pooling (mean for encoders, last token for decoders)
    normalize: bool = False
    auto: bool = False  # HTSR per-block learning rates and early stopping
    patience: int = 0
    dtype: str = "auto"
    device: str = "auto"
    checkpoint_dir: str = ""
    base_fingerprint: str = ""  # the gateway's base model; the worker refuses another ("" = not checked)
    tracking: TrackingSpec | None = None  # the job's MLflow run (tracking.py); None = not tracked

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (for checkpoint signatures): everything but where to save, where
        to log, and the base model check (a resumed run on another base fails that check before it loads a checkpoint)."""
        skip = ("checkpoint_dir", "base_fingerprint", "tracking")
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if not self.holdout_from:  # runs without a validation dataset keep the signatures they always had
            del fields["holdout_from"]
        return fields


@dataclass(kw_only=True)
class LoraOutcome:
    """What every LoRA-training job returns: the adapter weights and how the run went."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r]) fp32
    rank: int
    alpha: float
    labels: list[str]
    metrics: dict[str, float]
    fingerprint: str
    base_prefix: str
    normalize: bool
    confusion: list[list[int]] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0  # the step this attempt resumed at (0 = from scratch)

    def tensors(self) -> Iterable[torch.Tensor]:
        return [t for pair in self.lora.values() for t in pair]


@dataclass(kw_only=True)
class LoraResult(LoraOutcome):
    """A `lora` job: LoRA plus a task head."""

    weight: torch.Tensor  # head [labels, hidden] fp32
    bias: torch.Tensor  # [labels]
    head_input: str

    def tensors(self) -> Iterable[torch.Tensor]:
        return [*super().tensors(), self.weight, self.bias]


@dataclass
class _Plan:
    epochs: int
    steps_per_epoch: int
    total: int
    eval_every: int
    progress_every: int
    warmup: int
    patience: int

    @classmethod
    def of(cls, params: LoraParams, train_rows: int, batch: int) -> _Plan:
        per_epoch = steps_per_epoch(train_rows, batch)
        epochs = params.epochs or min(MAX_DEFAULT_EPOCHS, max(1, math.ceil(TARGET_STEPS / per_epoch)))
        total = epochs * per_epoch
        if params.max_steps:
            total = min(total, params.max_steps)
        eval_every = params.eval_every or max(MIN_EVAL_EVERY, math.ceil(total / EVALS_PER_RUN))
        return cls(
            epochs=epochs, steps_per_epoch=per_epoch, total=total, eval_every=min(eval_every, total),
            progress_every=max(1, total // PROGRESS_UPDATES), warmup=max(1, round(total * WARMUP_FRACTION)),
            patience=params.patience or DEFAULT_PATIENCE,
        )

    def schedule(self, step: int) -> float:
        """Linear warm-up to 1, then linear decay to 0 at `total` (step counts from 0)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def _better(a: Scores, b: Scores | None) -> bool:
    return b is None or (a.macro_f1, -a.loss) > (b.macro_f1, -b.loss)


class _Trainer:
    """One attempt at a LoRA job: the state a checkpoint saves, and the loop that advances it."""

    WHAT = "LoRA"  # for the first message
    TRAIN_HEAD = True

    def __init__(
        self, texts: list[str], labels: list[str], model_dir: str, params: LoraParams, report: Report
    ) -> None:
        self.params, self.report = params, report
        self.names = label_order(labels)
        index = {name: i for i, name in enumerate(self.names)}
        self.y = torch.tensor([index[label] for label in labels])
        split = job_split(texts, labels, params.validation_fraction, params.seed, params.holdout_from)
        self.train_idx = split.train
        self.val_idx = split.validation or split.train  # only when no class has two distinct texts
        self.eval_idx = self._eval_subset(self.val_idx)
        self.batch = params.batch_size or DEFAULT_BATCH
        self.plan = _Plan.of(params, len(self.train_idx), self.batch)
        self.signature = signature(texts, labels, type(params).__name__, params.identity())
        self.checkpoints = CheckpointDir(params.checkpoint_dir) if params.checkpoint_dir else None
        report(make_update(
            "started",
            f"training {self.WHAT} on {len(texts)} rows ({len(split.train)} train, {len(split.validation)} validation), "
            f"{len(self.names)} labels: {self.plan.epochs} epoch(s), {self.plan.total} steps of {self.batch}", 0.0,
        ))
        self.base = self._load(model_dir)
        self.model = self._build()
        max_tokens = min(params.max_tokens or DEFAULT_MAX_TOKENS, self.base.spec.max_tokens)
        self.ids = tokenize(self.base.tokenizer, texts, max_tokens)
        self.lengths = [len(r) for r in self.ids]
        self.optimizer, self.group_blocks = self._optimizer()
        self.block_lr: dict[int, float] = {b: 1.0 for b in self.group_blocks}
        self.step = self.epoch = self.position = 0
        self.best: Scores | None = None
        self.best_weights: dict[str, torch.Tensor] = self.model.snapshot()
        self.stale = 0  # evaluations since the last improvement
        self.stopped = ""
        self.resumed_from = 0
        self.recent: list[float] = []

    # ----- set-up -----------------------------------------------------------------------------

    def _eval_subset(self, rows: list[int]) -> list[int]:
        if len(rows) <= self.params.max_eval_rows:
            return rows
        return sorted(random.Random(self.params.seed).sample(rows, self.params.max_eval_rows))

    def _load(self, model_dir: str) -> BaseModel:
        began = time.monotonic()
        base = load_training_base(model_dir, self.params.base_fingerprint, self.params.dtype, self.params.device)
        took = time.monotonic() - began
        self.report(make_update(
            "log", f"loaded base model {base.spec.model_type} (hidden {base.spec.hidden_size}, {base.dtype}) in {took:.1f} s", LOADED,
        ))
        return base

    def _build(self) -> LoraClassifier:
        params, spec = self.params, self.base.spec
        first = params.first_block if params.first_block >= 0 else default_first_block(spec)
        targets = select_targets(spec, first, params.target_kinds)
        rank = params.rank or DEFAULT_RANK
        head_input = params.head_input or spec.default_pooling.value
        model = LoraClassifier(self.base, len(self.names), targets, rank, params.alpha or 2.0 * rank, head_input, params.normalize)
        model.head.requires_grad_(self.TRAIN_HEAD)
        frozen = f"blocks 0-{first - 1} frozen, " if first > 0 else ""
        self.report(make_update(
            "log", f"LoRA r={rank} on {len(targets)} linear layers of blocks {first}-{block_count(spec) - 1} ({frozen}"
            f"{sum(p.numel() for p in model.trainable().values())} trainable parameters); head reads {head_input} states",
            LOADED,
        ))
        return model

    def _optimizer(self) -> tuple[torch.optim.AdamW, list[int]]:
        """One parameter group per block (so each can get its own learning rate), the head last."""
        trainable = self.model.trainable()
        blocks = self.model.blocks()
        order = sorted(b for b in blocks if b >= 0) + [-1]
        groups = [{"params": [trainable[n] for n in blocks[b]], "block": b} for b in order if b in blocks]
        lr = self.params.learning_rate or DEFAULT_LEARNING_RATE
        for group in groups:
            group["lr"] = lr * (HEAD_LR_SCALE if group["block"] == -1 else 1.0)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY), [g["block"] for g in groups]

    # ----- checkpoints ------------------------------------------------------------------------

    def save(self) -> None:
        if self.checkpoints is None:
            return
        tensors, optim_meta = optimizer_tensors(self.optimizer)
        tensors |= {f"param/{k}": v for k, v in self.model.snapshot().items()}
        tensors |= {f"best/{k}": v for k, v in self.best_weights.items()}
        tensors["rng/torch"] = torch.get_rng_state()
        meta = {
            "signature": self.signature, "step": self.step, "epoch": self.epoch, "position": self.position,
            "stale": self.stale, "block_lr": {str(k): v for k, v in self.block_lr.items()}, "optimizer": optim_meta,
            "best": None if self.best is None else dataclasses.asdict(self.best),
        }
        self.checkpoints.save(tensors, meta)

    def resume(self) -> None:
        saved = self.checkpoints.load(self.signature) if self.checkpoints else None
        if saved is None:
            return
        tensors, meta = saved.tensors, saved.meta
        self.model.restore({k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")})
        self.best_weights = {k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")}
        load_optimizer(self.optimizer, {k: v for k, v in tensors.items() if k.startswith("optim/")}, meta["optimizer"])
        torch.set_rng_state(tensors["rng/torch"])
        self.step, self.epoch, self.position, self.stale = meta["step"], meta["epoch"], meta["position"], meta["stale"]
        self.block_lr = {int(k): float(v) for k, v in meta["block_lr"].items()}
        self.best = Scores(**meta["best"]) if meta.get("best") else None
        self.resumed_from = self.step
        self.report(make_update(
            "log", f"resumed from the checkpoint at step {self.step}/{self.plan.total} (epoch {self.epoch + 1})",
            self._progress(),
        ))

    # ----- the loop ---------------------------------------------------------------------------

    def _progress(self) -> float:
        return LOADED + (TRAINED - LOADED) * self.step / self.plan.total

    def _set_learning_rates(self) -> None:
        scale = self.plan.schedule(self.step)
        base_lr = self.params.learning_rate or DEFAULT_LEARNING_RATE
        for group in self.optimizer.param_groups:
            block = group["block"]
            group["lr"] = base_lr * scale * (HEAD_LR_SCALE if block == -1 else self.block_lr.get(block, 1.0))

    def _train_step(self, rows: list[int]) -> float:
        ids, mask = pad([self.ids[i] for i in rows], self.model.pad_id, self.base.device)
        logits = self.model(ids, mask)
        return self._descend(F.cross_entropy(logits, self.y[rows].to(logits.device)))

    def _descend(self, loss: torch.Tensor) -> float:
        """One optimizer step on `loss`, checked first: a diverged loss stops the job before it touches the weights."""
        value = float(loss.detach())
        self._check(value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value

    def _check(self, loss: float) -> None:
        step = self.step + 1
        if not math.isfinite(loss):
            kind = "NaN" if math.isnan(loss) else "infinite"
            raise TrainingDiverged(f"training diverged: loss became {kind} at step {step}; try a lower learning_rate")
        self.recent = (self.recent + [loss])[-EXPLODED_WINDOW:]
        guess = self._chance_loss()
        if len(self.recent) == EXPLODED_WINDOW and sum(self.recent) / EXPLODED_WINDOW > EXPLODED * guess:
            raise TrainingDiverged(
                f"training diverged: the training loss grew to {sum(self.recent) / EXPLODED_WINDOW:.1f} by step {step} "
                f"(a model that guesses scores {guess:.2f}); try a lower learning_rate"
            )

    def _chance_loss(self) -> float:
        """The loss of a model that guesses uniformly: ln(labels)."""
        return math.log(max(2, len(self.names)))

    @torch.inference_mode()
    def evaluate(self, rows: list[int]) -> Scores:
        logits = []
        for batch in eval_batches(rows, self.lengths, EVAL_BATCH):
            ids, mask = pad([self.ids[i] for i in batch], self.model.pad_id, self.base.device)
            logits.append((batch, self.model(ids, mask).float().cpu()))
        order = [i for batch, _ in logits for i in batch]
        stacked = torch.cat([out for _, out in logits])
        return score(stacked, self.y[order], self.step, len(self.names))

    def _htsr(self) -> None:
        """Per-block alpha of the current (merged) weights -> per-block learning-rate multipliers."""
        alphas: dict[int, list[float]] = {}
        with torch.no_grad():
            for name, module in self.model.lora_modules():
                block = block_of(name)
                a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
                weight = module.base_layer.weight.float()
                delta = (b @ a) * self.model.scaling
                merged = weight + (delta if weight.shape == delta.shape else delta.t())
                alphas.setdefault(block if block is not None else -1, []).append(hill_alpha(merged))
        mean = {b: sum(v) / len(v) for b, v in alphas.items()}
        self.block_lr = multipliers(mean)
        base_lr = self.params.learning_rate or DEFAULT_LEARNING_RATE
        rates = [BlockRate(b, mean[b], self.block_lr[b], base_lr * self.block_lr[b]) for b in sorted(mean)]
        self.report(make_update(
            "log", f"epoch {self.epoch + 1}: per-block learning rates from HTSR alpha: {describe(rates)}", self._progress(),
            details={"blocks": [r.as_dict() for r in rates]}, step=self.step,
        ))

    def _after_eval(self, scores: Scores, began: float, done: int) -> None:
        """Keep the best weights, checkpoint, then report: whoever sees the eval event can rely on the checkpoint."""
        if _better(scores, self.best):
            self.best, self.best_weights, self.stale = scores, self.model.snapshot(), 0
        else:
            self.stale += 1
        if self.params.auto and self.stale >= self.plan.patience and self.step < self.plan.total:
            self.stopped = (f"early stopping at step {self.step}: no validation improvement in "
                            f"{self.stale} evaluations (best at step {self.best.step if self.best else 0})")
        self.save()
        eta = (time.monotonic() - began) / max(1, done) * (self.plan.total - self.step)
        message = (f"step {self.step}/{self.plan.total}: validation loss {scores.loss:.4f}, "
                   f"accuracy {scores.accuracy:.4f}, macro-F1 {scores.macro_f1:.4f}")
        self.report(make_update("eval", message, self._progress(), eta, scores.metrics, step=self.step))

    def run(self) -> LoraResult:
        self.resume()
        began, at_start = time.monotonic(), self.step
        while self.step < self.plan.total and not self.stopped:
            if self.params.auto and self.position == 0:
                self._htsr()
            batches = epoch_batches(self.train_idx, self.lengths, self.batch, self.params.seed, self.epoch)
            for rows in batches[self.position :]:
                self._set_learning_rates()
                self._train_step(rows)
                self.step += 1
                self.position += 1
                done = self.step - at_start
                if self.step % self.plan.progress_every == 0:
                    eta = (time.monotonic() - began) / done * (self.plan.total - self.step)
                    self.report(make_update("progress", f"step {self.step}/{self.plan.total} (epoch {self.epoch + 1})",
                                            self._progress(), eta))
                if self.step % self.plan.eval_every == 0 or self.step == self.plan.total:
                    self._after_eval(self.evaluate(self.eval_idx), began, done)
                if self.step >= self.plan.total or self.stopped:
                    break
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
        return self._finish()

    def _finish(self) -> LoraResult:
        if self.stopped:
            self.report(make_update("log", self.stopped, self._progress()))
        self.model.restore(self.best_weights)
        final = self.evaluate(self.val_idx)
        if not all(torch.isfinite(p).all() for p in self.model.trainable().values()):
            raise TrainingDiverged("training diverged: the trained weights are not finite")
        best_step = self.best.step if self.best else self.step
        confusion = describe_confusion(self.names, final.confusion)
        self.report(make_update(
            "eval", f"kept the weights of step {best_step}: on all {len(self.val_idx)} validation rows loss {final.loss:.4f}, "
            f"accuracy {final.accuracy:.4f}, macro-F1 {final.macro_f1:.4f}" + (f"; {confusion}" if confusion else ""),
            TRAINED, 0.0, final.metrics, details={"confusion": {"labels": self.names, "matrix": final.confusion}},
        ))
        return self._result(final)

    def _result(self, final: Scores) -> LoraResult:
        return LoraResult(
            lora=self.model.lora_weights(), rank=self.model.rank, alpha=self.model.alpha,
            weight=self.model.head.weight.detach().float().clone(), bias=self.model.head.bias.detach().float().clone(),
            labels=self.names, metrics=final.metrics, fingerprint=self.base.spec.fingerprint,
            base_prefix=self.base.spec.base_prefix, head_input=self.model.head_input, normalize=self.model.normalize,
            confusion=final.confusion, steps=self.step, resumed_from=self.resumed_from,
        )


def train_lora(texts: list[str], labels: list[str], model_dir: str, params: LoraParams, report: Report) -> LoraResult:
    """Split, train with evaluations and checkpoints, keep the best weights. Raises TrainingDiverged."""
    torch.manual_seed(params.seed)
    return _Trainer(texts, labels, model_dir, params, report).run()


P = TypeVar("P", bound=LoraParams)


def lora_params(kind: type[P]) -> Callable[[JobSpec, Context], P]:
    """Builds `kind` (LoraParams or a method's extension of it) for a job; the default rank stays within
    what this server's adapter store accepts."""

    def build(spec: JobSpec, context: Context) -> P:
        return kind(
            validation_fraction=spec.validation_fraction, epochs=spec.epochs, learning_rate=spec.learning_rate,
            seed=spec.seed, batch_size=spec.batch_size, rank=spec.lora_rank or min(DEFAULT_RANK, context.limits.max_lora_rank),
            max_tokens=spec.max_tokens, max_steps=spec.max_steps, auto=spec.auto, base_fingerprint=context.base_fingerprint,
        )

    return build


def check_rank(spec: JobSpec, limits: JobLimits) -> None:
    """Publishing refuses ranks above the server's max_lora_rank, so a job must not train one first."""
    if spec.lora_rank > limits.max_lora_rank:
        raise InvalidArgument(
            f"lora_rank must be between 0 (the default) and {limits.max_lora_rank} (this server's max_lora_rank); "
            f"got {spec.lora_rank}"
        )


def lora_result_files(result: LoraResult, source: str) -> dict[str, bytes]:
    """LoRA weights on the upper blocks plus the task head."""
    return lora_files(
        result.lora, result.rank, result.alpha, result.weight, result.bias, result.labels, result.fingerprint, source,
        base_prefix=result.base_prefix, head_input=result.head_input, normalize=result.normalize,
    )


METHOD = Method("lora", LoraParams, lora_params(LoraParams), train_lora, lora_result_files, check=check_rank, resumable=True)
