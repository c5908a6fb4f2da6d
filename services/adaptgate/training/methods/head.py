"""The `head` method: frozen base embeddings plus a linear softmax head. Runs inside a Ray worker.

Pure torch and the engine's own `encode`, so the head sees exactly the features serving will
compute for it (same pooling, same normalization, same dtype choice).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from adaptgate.adapters.format import head_only_files
from adaptgate.engine.model import BaseModel
from adaptgate.training.data.splits import Split, job_split
from adaptgate.training.jobs.records import JobSpec
from adaptgate.training.methods.abstain import Abstention, calibrate_head
from adaptgate.training.methods.evaluation import confusion_matrix
from adaptgate.training.methods.head_embed import embed_texts
from adaptgate.training.methods.head_fit import Evaluation, FitConfig, FittedHead, TrainingDiverged, fit_linear_head
from adaptgate.training.methods.method import Context, Method, SpecParams
from adaptgate.training.runners.updates import Report, make_update
from adaptgate.training.runners.worker_base import load_training_base
from adaptgate.training.tracking import TrackingSpec

__all__ = ["METHOD", "HeadParams", "HeadResult", "TrainingDiverged", "train_head"]

DEFAULT_STEPS = 500
DEFAULT_LEARNING_RATE = 0.05
LOADED, EMBEDDED, FITTED = 0.02, 0.85, 0.99  # progress milestones


@dataclass(frozen=True)
class HeadParams(SpecParams):
    """`epochs` counts full-batch optimisation steps over the cached embeddings (0 = 500)."""

    batch_size: int = 64
    weight_decay: float = 1e-5
    eval_every: int = 25
    dtype: str = "auto"
    device: str = "auto"
    base_fingerprint: str = ""  # the gateway's base model; the worker refuses another ("" = not checked)
    holdout_from: int = 0  # rows from here on are the tenant's validation dataset (0: split off validation_fraction)
    out_of_scope_label: str = ""  # a class whose answers abstain; its validation rows set the abstain threshold (abstain.py)
    tracking: TrackingSpec | None = None  # the job's MLflow run (tracking.py); None = not tracked

    def fit_config(self) -> FitConfig:
        return FitConfig(
            steps=self.epochs or DEFAULT_STEPS, learning_rate=self.learning_rate or DEFAULT_LEARNING_RATE,
            weight_decay=self.weight_decay, eval_every=self.eval_every,
        )


@dataclass
class HeadResult:
    weight: torch.Tensor  # [labels, hidden] fp32
    bias: torch.Tensor  # [labels] fp32
    labels: list[str]
    metrics: dict[str, float]
    fingerprint: str
    head_input: str = "mean"
    normalize: bool = True
    # confusion[t][p] on the validation rows with the kept weights (label ids in `labels` order)
    confusion: list[list[int]] = field(default_factory=list)
    abstain: Abstention | None = None  # when the rows had an out-of-scope label

    def tensors(self) -> Iterable[torch.Tensor]:
        return (self.weight, self.bias)


def label_order(labels: list[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), others alphabetically after them."""
    return sorted(set(labels), key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def _load(model_dir: str, params: HeadParams, report: Report) -> BaseModel:
    started = time.monotonic()
    base = load_training_base(model_dir, params.base_fingerprint, params.dtype, params.device)
    took = time.monotonic() - started
    message = f"loaded base model {base.spec.model_type} (hidden {base.spec.hidden_size}, {base.dtype}) in {took:.1f} s"
    report(make_update("log", message, LOADED))
    return base


def _embed(base: BaseModel, texts: list[str], params: HeadParams, report: Report) -> torch.Tensor:
    started = time.monotonic()

    def on_chunk(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / done * (total - done)
        progress = LOADED + (EMBEDDED - LOADED) * done / total
        report(make_update("progress", f"embedded {done}/{total} texts", progress, eta))

    return embed_texts(base, texts, params.batch_size, on_chunk)


def _validation(split: Split) -> list[int]:
    return split.validation or split.train  # only when no class has two distinct texts


def _fit(features: torch.Tensor, y: torch.Tensor, split: Split, params: HeadParams, report: Report) -> FittedHead:
    config = params.fit_config()
    started = time.monotonic()
    validation = _validation(split)

    def on_eval(ev: Evaluation) -> None:
        eta = (time.monotonic() - started) / ev.step * (config.steps - ev.step)
        message = f"step {ev.step}/{config.steps}: validation loss {ev.loss:.4f}, accuracy {ev.accuracy:.4f}, macro-F1 {ev.macro_f1:.4f}"
        report(make_update("eval", message, EMBEDDED + (FITTED - EMBEDDED) * ev.step / config.steps, eta, ev.metrics,
                           step=ev.step))

    train = (features[split.train], y[split.train])
    held = (features[validation], y[validation])
    return fit_linear_head(train, held, int(y.max()) + 1, config, on_eval)


def train_head(
    texts: list[str], labels: list[str], model_dir: str, params: HeadParams, report: Report
) -> HeadResult:
    """Split, embed, fit, keep the lowest-validation-loss weights. Raises TrainingDiverged on NaN/inf."""
    torch.manual_seed(params.seed)
    names = label_order(labels)
    index = {name: i for i, name in enumerate(names)}
    y = torch.tensor([index[label] for label in labels])
    split = job_split(texts, labels, params.validation_fraction, params.seed, params.holdout_from)
    report(make_update("started", f"training a head on {len(texts)} rows ({len(split.train)} train, "
                       f"{len(split.validation)} validation), {len(names)} labels", 0.0))
    base = _load(model_dir, params, report)
    features = _embed(base, texts, params, report)
    fitted = _fit(features, y, split, params, report)
    best = fitted.best
    held = _validation(split)
    logits = features[held] @ fitted.weight.t() + fitted.bias
    confusion = confusion_matrix(logits.argmax(dim=1), y[held], len(names))
    report(make_update(
        "log", f"kept the weights of step {best.step} (lowest validation loss {best.loss:.4f})", FITTED, 0.0, best.metrics,
        details={"confusion": {"labels": names, "matrix": confusion}},
    ))
    oos = params.out_of_scope_label
    abstain = calibrate_head(torch.softmax(logits, dim=1), y[held], index[oos], oos) if oos in index else None
    if abstain is not None:
        report(make_update("log", f"the head {abstain.describe()}", FITTED, 0.0, best.metrics | abstain.metrics))
    return HeadResult(
        fitted.weight, fitted.bias, names, best.metrics | (abstain.metrics if abstain else {}), base.spec.fingerprint,
        base.spec.default_pooling.value, confusion=confusion, abstain=abstain,
    )


def head_params(spec: JobSpec, context: Context) -> HeadParams:
    return HeadParams(
        validation_fraction=spec.validation_fraction, epochs=spec.epochs, learning_rate=spec.learning_rate, seed=spec.seed,
        base_fingerprint=context.base_fingerprint, out_of_scope_label=spec.out_of_scope_label,
    )


def head_files(result: HeadResult, source: str) -> dict[str, bytes]:
    """A head-only adapter: serving embeds with the base, then applies the head (and its abstain threshold)."""
    abstain = (result.abstain.threshold, result.abstain.label) if result.abstain else None
    return head_only_files(
        result.weight, result.bias, result.labels, result.fingerprint, source,
        head_input=result.head_input, normalize=result.normalize, abstain=abstain,
    )


def effective(params: HeadParams) -> dict[str, object]:
    """The steps and learning rate the head trains with once 0 ("the default") is filled in."""
    config = params.fit_config()
    return {"effective_steps": config.steps, "effective_learning_rate": config.learning_rate}


METHOD = Method(
    "head", HeadParams, head_params, train_head, head_files, abstains=True, tracked=effective,
    final_step=lambda params, result: params.fit_config().steps,
)
