"""A job's checkpoint directory: the latest training state, and the journal of its event stream.

Layout under `<root>/<job id>/` (root: the gateway's data dir, `checkpoints/`):
  state.safetensors   trainable weights, optimizer moments, best weights so far, RNG state; the
                      step, epoch, scores and learning-rate table as JSON in the file's metadata.
                      One file written to a temporary name and renamed, so a reader sees the old
                      checkpoint or the new one, never half of each.
  journal.json        how many updates the job's Ray stream has carried so far (see ray_runner.py).

Only safetensors and JSON are read back: no pickle, even of our own files. A checkpoint records a
signature of the job's inputs (data, labels, parameters); a different signature is ignored, so a
stale directory can never leak into another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
JOURNAL_FILE = "journal.json"
FORMAT = 1


def signature(*parts: object) -> str:
    """A stable digest of the job's inputs (texts, labels, parameters as JSON)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _replace(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointDir:
    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory)

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        body = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        header = {"adaptgate": json.dumps({**meta, "format": FORMAT})}
        _replace(self.path / STATE_FILE, lambda tmp: save_file(body, str(tmp), metadata=header))

    def load(self, expected_signature: str) -> Checkpoint | None:
        """The saved state when it exists and was made for these inputs, else None."""
        path = self.path / STATE_FILE
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("adaptgate", "{}"))
            if meta.get("format") != FORMAT or meta.get("signature") != expected_signature:
                return None
            return Checkpoint(load_file(str(path)), meta)
        except (OSError, ValueError, json.JSONDecodeError):  # a torn or foreign file: start afresh
            return None

    def journal(self) -> int:
        """Updates already carried by the job's stream (0 when unknown)."""
        try:
            return int(json.loads((self.path / JOURNAL_FILE).read_text())["updates"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def set_journal(self, updates: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _replace(self.path / JOURNAL_FILE, lambda tmp: tmp.write_text(json.dumps({"updates": updates})))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ----- optimizer state as flat tensors (safetensors holds tensors only) ----------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = float(value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
