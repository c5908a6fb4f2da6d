"""The training methods behind one call: what each takes and returns, and how `auto` chooses.

`auto` picks `head` (frozen embeddings + a linear head, seconds of CPU) when the data is small
or thin per class, where a head is as accurate as finetuning and cannot overfit the base; and
`lora` with per-block HTSR learning rates and early stopping otherwise. `auto` trains
classifiers; `embed` (contrastive LoRA for `Embed`) is only ever asked for by name. Thresholds: fewer than
HEAD_MAX_ROWS rows, or fewer than HEAD_MAX_ROWS_PER_LABEL rows per label on average -> head.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from adaptgate.training.embed import EmbedParams, EmbedResult, train_embed
from adaptgate.training.head import HeadParams, HeadResult, train_head
from adaptgate.training.lora import LoraParams, LoraResult, train_lora
from adaptgate.training.tracking import log_confusion, open_tracker, tracked_report
from adaptgate.training.updates import Report

TrainParams = Union[HeadParams, LoraParams, EmbedParams]
TrainResult = Union[HeadResult, LoraResult, EmbedResult]

HEAD_MAX_ROWS = 1000
HEAD_MAX_ROWS_PER_LABEL = 50


def choose_method(rows: int, labels: int, out_of_scope: bool = False) -> tuple[str, str]:
    """(method, the reason in a sentence) for a dataset of `rows` rows and `labels` labels."""
    per_label = rows / max(1, labels)
    if out_of_scope:
        return "head", (
            f"method 'auto' chose 'head' for {rows} rows and {labels} labels: the out-of-scope label's abstain "
            "threshold is calibrated by the head method"
        )
    if rows < HEAD_MAX_ROWS:
        return "head", (
            f"method 'auto' chose 'head' for {rows} rows and {labels} labels: under {HEAD_MAX_ROWS} rows a linear head "
            "on frozen embeddings is as accurate as finetuning, and takes seconds"
        )
    if per_label < HEAD_MAX_ROWS_PER_LABEL:
        return "head", (
            f"method 'auto' chose 'head' for {rows} rows and {labels} labels: {per_label:.0f} rows per label are too few "
            "to finetune the base without overfitting it"
        )
    return "lora", (
        f"method 'auto' chose 'lora' for {rows} rows and {labels} labels ({per_label:.0f} per label): LoRA on the upper "
        "blocks with per-block learning rates from HTSR alpha, and early stopping on validation"
    )


# Parameters that say where a job runs or logs, not how it trains: kept out of the tracked hyperparameters.
UNTRACKED_PARAMS = ("tracking", "checkpoint_dir", "base_fingerprint")


def hyperparameters(params: TrainParams, texts: list[str], labels: list[str]) -> dict[str, object]:
    """Everything the job trains with, as asked (0 = the method's default), plus the data's size."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in UNTRACKED_PARAMS}
    fields.update(params_class=type(params).__name__, rows=len(texts), label_count=len(set(labels)))
    if isinstance(params, HeadParams):
        config = params.fit_config()
        fields.update(effective_steps=config.steps, effective_learning_rate=config.learning_rate)
    return fields


def train(texts: list[str], labels: list[str], model_dir: str, params: TrainParams, report: Report) -> TrainResult:
    """Runs the job's method where the job runs (a Ray worker), logging to the job's run when it is tracked."""
    tracker = open_tracker(params.tracking)
    tracker.log_params(hyperparameters(params, texts, labels))
    result = _train(texts, labels, model_dir, params, tracked_report(tracker, report))
    final_step = params.fit_config().steps if isinstance(params, HeadParams) else getattr(result, "steps", 0)
    tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items()}, final_step)
    log_confusion(tracker, result.labels, result.confusion)
    return result


def _train(texts: list[str], labels: list[str], model_dir: str, params: TrainParams, report: Report) -> TrainResult:
    if isinstance(params, EmbedParams):  # before LoraParams: EmbedParams is one
        return train_embed(texts, labels, model_dir, params, report)
    if isinstance(params, LoraParams):
        return train_lora(texts, labels, model_dir, params, report)
    return train_head(texts, labels, model_dir, params, report)
