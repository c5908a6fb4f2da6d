"""`auto`, the default method: picks `head` or `lora` per dataset at submit time.

`auto` picks `head` (frozen embeddings + a linear head, seconds of CPU) when the data is small
or thin per class, where a head is as accurate as finetuning and cannot overfit the base; and
`lora` with per-block HTSR learning rates and early stopping otherwise. `auto` trains
classifiers; `embed` (contrastive LoRA for `Embed`) is only ever asked for by name. Thresholds: fewer than
HEAD_MAX_ROWS rows, or fewer than HEAD_MAX_ROWS_PER_LABEL rows per label on average -> head.
Importing this module is cheap (no torch): job records take their default method from it.
"""

from __future__ import annotations

AUTO = "auto"
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


