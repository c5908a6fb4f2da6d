"""Where the benchmarks find their datasets: the repository's examples, or a larger collection.

SMS spam ships in `examples/data`. SST-2 and AG News do not; point `ADAPTGATE_BENCH_DATASETS` at a folder
holding `sst2/`, `ag_news/`, ... (each with `train.jsonl`, `test.jsonl`: one `{"text", "label"}` per line)
to run the benchmarks on them. A benchmark falls back to SMS spam, or says what it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"


def collection() -> Path | None:
    """The folder named by ADAPTGATE_BENCH_DATASETS, None when unset."""
    value = os.environ.get("ADAPTGATE_BENCH_DATASETS", "").strip()
    return Path(value).expanduser() if value else None


def dataset_dir(name: str) -> Path | None:
    """`name`'s folder: from the collection when it has one, else from the examples; None when neither does."""
    root = collection()
    for folder in ([root / name] if root is not None else []) + [EXAMPLES / name]:
        if folder.is_dir():
            return folder
    return None


def split_file(name: str, split: str = "train") -> Path | None:
    folder = dataset_dir(name)
    path = folder / f"{split}.jsonl" if folder is not None else None
    return path if path is not None and path.is_file() else None
