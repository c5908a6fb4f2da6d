"""CheckpointDir on shared storage: what one process saves, another process (another node) loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptgate.storage import Storage
from adaptgate.training.runners.checkpoints import STATE_FILE, CheckpointDir, signature

TENSORS = {"param/a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "rng/torch": torch.get_rng_state()}
META = {"signature": signature("inputs"), "step": 40, "best": {"accuracy": 0.9}}


@pytest.mark.parametrize("writer,reader", [("path", "file-uri"), ("file-uri", "path"), ("memory", "memory")])
def test_a_checkpoint_saved_through_one_storage_loads_through_another(tmp_path: Path, writer: str, reader: str) -> None:
    names = {"path": str(tmp_path / "ckpt" / "job-1"), "file-uri": f"file://{tmp_path}/ckpt/job-1",
             "memory": "memory://checkpoints-test/job-1"}
    CheckpointDir(Storage(names[writer])).save(TENSORS, META)
    CheckpointDir(names[writer]).set_journal(7)
    other = CheckpointDir(names[reader])
    loaded = other.load(signature("inputs"))
    assert loaded is not None and loaded.meta["step"] == 40 and loaded.meta["best"] == {"accuracy": 0.9}
    assert set(loaded.tensors) == set(TENSORS)
    for name, tensor in TENSORS.items():
        torch.testing.assert_close(loaded.tensors[name], tensor)
    assert other.journal() == 7
    other.remove()
    assert CheckpointDir(names[writer]).load(signature("inputs")) is None and CheckpointDir(names[writer]).journal() == 0


def test_a_checkpoint_of_other_inputs_or_a_torn_file_is_not_loaded(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path)
    directory.save(TENSORS, META)
    assert directory.load(signature("other inputs")) is None
    for torn in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", (tmp_path / STATE_FILE).read_bytes()[:-10]):
        (tmp_path / STATE_FILE).write_bytes(torn)
        assert directory.load(signature("inputs")) is None


def test_a_missing_checkpoint_is_none_and_its_location_is_not_created(tmp_path: Path) -> None:
    directory = CheckpointDir(f"file://{tmp_path}/never")
    assert directory.load(signature("inputs")) is None and directory.journal() == 0
    directory.remove()
    assert not (tmp_path / "never").exists()
