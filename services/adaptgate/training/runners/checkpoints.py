"""A job's checkpoint directory: the latest training state, and the journal of its event stream.

Layout under `<checkpoints>/<job id>/`, on shared storage (storage.py: `ADAPTGATE_STORAGE_URI`, else
the gateway's data dir), so the Ray worker that resumes a job may run on another node than the
one that saved it:
  state.safetensors   trainable weights, optimizer moments, best weights so far, RNG state; the
                      step, epoch, scores and learning-rate table as JSON in the file's metadata.
                      Serialized in memory and written as one atomic whole-file write (a rename
                      on a mounted filesystem, one upload on an object store), so a reader sees
                      the old checkpoint or the new one, never half of each.
  journal.json        how many updates the job's Ray stream has carried so far (see ray_runner.py).

Only safetensors and JSON are read back: no pickle, even of our own files. A checkpoint records a
signature of the job's inputs (data, labels, parameters); a different signature is ignored, so a
stale directory can never leak into another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from adaptgate.storage import Storage

STATE_FILE = "state.safetensors"
JOURNAL_FILE = "journal.json"
FORMAT = 1
META_KEY = "adaptgate"


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


def _metadata(data: bytes) -> dict[str, Any]:
    """Our JSON from a safetensors file's header (8-byte little-endian length, then a JSON header):
    read before the tensors, so another run's checkpoint costs no tensor decoding."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return json.loads((header.get("__metadata__") or {}).get(META_KEY, "{}"))


class CheckpointDir:
    def __init__(self, location: Storage | str | os.PathLike[str]) -> None:
        self.storage = location if isinstance(location, Storage) else Storage(location)

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        body = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        header = {META_KEY: json.dumps({**meta, "format": FORMAT})}
        self.storage.child(STATE_FILE).write_bytes(save(body, metadata=header))

    def load(self, expected_signature: str) -> Checkpoint | None:
        """The saved state when it exists and was made for these inputs, else None."""
        try:
            data = self.storage.child(STATE_FILE).read_bytes()
            meta = _metadata(data)
            if meta.get("format") != FORMAT or meta.get("signature") != expected_signature:
                return None
            return Checkpoint(load(data), meta)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError, TypeError, struct.error, SafetensorError):  # torn or foreign: start afresh
            return None

    def journal(self) -> int:
        """Updates already carried by the job's stream (0 when unknown)."""
        try:
            return int(json.loads(self.storage.child(JOURNAL_FILE).read_bytes())["updates"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def set_journal(self, updates: int) -> None:
        self.storage.child(JOURNAL_FILE).write_bytes(json.dumps({"updates": updates}).encode())

    def remove(self) -> None:
        self.storage.remove_tree()


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
