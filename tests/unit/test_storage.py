"""Storage: one location, named by a path or an fsspec URI, that every gateway and Ray worker reaches."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptgate.settings import Settings
from adaptgate.storage import Storage, StorageError


@pytest.fixture(params=["path", "file-uri"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same temporary directory named both ways a deployment may name it."""
    return Storage(str(tmp_path) if request.param == "path" else f"file://{tmp_path}")


def test_a_plain_path_and_a_file_uri_name_the_same_files(tmp_path: Path) -> None:
    by_path = Storage(tmp_path).child("jobs", "j1", "state.bin")
    by_uri = Storage(f"file://{tmp_path}").child("jobs", "j1", "state.bin")
    assert not by_uri.exists()
    by_path.write_bytes(b"weights")  # creates the missing folders
    assert by_uri.exists() and by_uri.read_bytes() == b"weights"
    assert (tmp_path / "jobs" / "j1" / "state.bin").read_bytes() == b"weights"
    assert by_uri.uri == f"file://{tmp_path}/jobs/j1/state.bin" and by_path.uri == f"{tmp_path}/jobs/j1/state.bin"


def test_a_relative_path_becomes_absolute_so_workers_in_another_directory_find_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Storage("data").child("checkpoints").uri == f"{tmp_path}/data/checkpoints"


def test_a_storage_travels_as_its_uri(root: Storage) -> None:
    """Ray ships job parameters to workers by pickling: the copy must reach the same files."""
    file = root.child("f")
    file.write_bytes(b"x")
    copy = pickle.loads(pickle.dumps(file))
    assert copy.uri == file.uri and copy.read_bytes() == b"x"


def test_a_failed_write_leaves_the_old_file_and_no_litter(root: Storage, tmp_path: Path) -> None:
    file = root.child("state.bin")
    file.write_bytes(b"old")

    def broken() -> Iterator[bytes]:
        yield b"half of the new"
        raise OSError("the disk is full")

    with pytest.raises(OSError, match="disk is full"):
        file.write_chunks(broken())
    assert file.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]  # the temporary file is gone too


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_mix(root: Storage) -> None:
    file = root.child("state.bin")
    old, new = b"a" * 300_000, b"b" * 200_000
    file.write_bytes(old)
    seen: set[bytes] = set()
    writing = True

    def read() -> None:
        while writing:
            seen.add(file.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for turn in range(60):
            file.write_chunks(iter([(new if turn % 2 else old)[:100_000]] * (2 if turn % 2 else 3)))
    finally:
        writing = False
        reader.join()
    assert seen <= {old, new} and seen


def test_whole_files_are_written_from_chunks_or_a_local_file_and_read_back_as_lines(root: Storage, tmp_path: Path) -> None:
    rows = root.child("datasets", "d1.jsonl")
    assert rows.write_chunks(iter([b'{"text": "a"}\n{"te', b'xt": "b"}\n'])) == 28
    assert list(rows.lines()) == ['{"text": "a"}', '{"text": "b"}'] and rows.size() == 28
    local = tmp_path / "upload.tmp"
    local.write_bytes(b"one\ntwo")
    copy = root.child("datasets", "d2.jsonl")
    copy.write_file(local)
    assert list(copy.lines()) == ["one", "two"] and local.exists()


def test_remove_tree_removes_a_folder_and_ignores_one_that_is_gone(root: Storage) -> None:
    job = root.child("checkpoints", "j1")
    job.child("state.bin").write_bytes(b"x")
    job.child("journal.json").write_bytes(b"{}")
    job.remove_tree()
    assert not job.exists() and not job.child("state.bin").exists() and root.child("checkpoints").exists()
    job.remove_tree()  # already gone: nothing to do, no error


def test_child_names_one_step_down_never_out(tmp_path: Path) -> None:
    for bad in ("..", "a/../..", "", "/etc", "a/b"):
        with pytest.raises(ValueError, match="one name"):
            Storage(tmp_path).child(bad)


def test_an_object_store_path_works_the_same(tmp_path: Path) -> None:
    """A non-local filesystem (fsspec's in-memory one, standing in for s3://): one put per whole file."""
    root = Storage("memory://adaptgate-test")
    file = root.child("checkpoints", "j1", "state.bin")
    file.write_chunks(iter([b"new ", b"state"]))
    assert Storage("memory://adaptgate-test/checkpoints/j1/state.bin").read_bytes() == b"new state"
    root.child("checkpoints", "j1").remove_tree()
    assert not file.exists()
    root.child("checkpoints", "j1").remove_tree()


def test_a_uri_without_its_driver_fails_with_a_sentence_an_operator_can_act_on() -> None:
    with pytest.raises(StorageError, match=r"no-such-driver://bucket.*fsspec"):
        Storage("no-such-driver://bucket/prefix")


def test_settings_put_checkpoints_under_the_storage_uri_or_the_data_dir(tmp_path: Path) -> None:
    local = Settings(data_dir=tmp_path / "data")
    assert local.storage_root == str(tmp_path / "data")
    assert local.checkpoints_dir.uri == f"{tmp_path}/data/checkpoints"
    shared = Settings(data_dir=tmp_path / "data", storage_uri=f"file://{tmp_path}/shared/")
    assert shared.storage_root == f"file://{tmp_path}/shared/"
    assert shared.checkpoints_dir.uri == f"file://{tmp_path}/shared/checkpoints"
    assert not shared.checkpoints_dir.exists()  # naming a location creates nothing


def test_training_resources_come_from_json_in_the_environment_or_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().training_resources == {}
    monkeypatch.setenv("ADAPTGATE_TRAINING_RESOURCES", '{"adaptgate-training": 1}')
    assert Settings().training_resources == {"adaptgate-training": 1.0}
    assert Settings(training_resources='{"gpu-pool": 0.5}').training_resources == {"gpu-pool": 0.5}
