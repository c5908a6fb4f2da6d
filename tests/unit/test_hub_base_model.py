"""The base model by Hugging Face id: found in the local Hugging Face cache, never downloaded; a clear
startup error naming the id, the cache searched and the fix when it is not there.

The cache is laid out as huggingface_hub lays out a download (blobs, snapshots/<commit> links, refs/main),
and huggingface_hub's own cache scanner must read it back before the gateway is asked to.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import scan_cache_dir
from huggingface_hub.constants import REPO_ID_SEPARATOR

from adaptgate.engine.hub import BaseModelNotFound, resolve_model_dir
from adaptgate.engine.model import load_base_model
from tests.unit.test_st_models import TEXTS, assert_same_vectors, engine_embed, save_st_model

REPO_ID = "tiny-org/tiny-e5"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parents[2]


def add_to_hub_cache(model_dir: Path, cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """`model_dir` as `hf download repo_id` leaves it: content-addressed blobs, a snapshot of relative links
    to them, and refs/main naming the commit. Returns the snapshot directory."""
    repo = cache / ("models" + REPO_ID_SEPARATOR + repo_id.replace("/", REPO_ID_SEPARATOR))
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache dir, the model directory it holds a copy of): a prompted sentence-transformers model."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = save_st_model(tiny_bert_dir, root / "model", "mean", True, prompts={"query": "query: "})
    cache = root / "hf-home" / "hub"
    add_to_hub_cache(model_dir, cache, REPO_ID)
    info = scan_cache_dir(cache)  # huggingface_hub itself reads the layout back
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and {r.commit_hash for r in repo.revisions} == {COMMIT}
    assert {f.file_name for r in repo.revisions for f in r.files} >= {"config.json", "modules.json", "model.safetensors"}
    return cache, model_dir


def test_a_hugging_face_id_resolves_to_its_cached_snapshot(hub_cache: tuple[Path, Path]) -> None:
    cache, _ = hub_cache
    directory, hub_id = resolve_model_dir(REPO_ID, cache_dir=cache)
    assert hub_id == REPO_ID
    assert directory == (cache / "models--tiny-org--tiny-e5" / "snapshots" / COMMIT).resolve()


def test_a_directory_stays_a_directory(tiny_bert_dir: Path) -> None:
    assert resolve_model_dir(str(tiny_bert_dir)) == (tiny_bert_dir, "")


def test_the_cached_model_loads_and_embeds_as_its_directory(
    hub_cache: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default cache is huggingface_hub's (HF_HUB_CACHE / HF_HOME, read when it is imported)."""
    cache, model_dir = hub_cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    base = load_base_model(REPO_ID, dtype="float32", device="cpu")
    assert base.name == REPO_ID and base.spec.prompts["query"] == "query: "
    assert base.spec.fingerprint == load_base_model(model_dir, dtype="float32", device="cpu").spec.fingerprint
    ours = engine_embed(base.path, TEXTS, prompt_name="query")
    assert_same_vectors(ours, engine_embed(model_dir, TEXTS, prompt_name="query"))
    assert np.isfinite(ours).all()


def test_a_model_missing_from_the_cache_names_id_cache_and_fix(tmp_path: Path) -> None:
    cache = tmp_path / "empty-hub"
    cache.mkdir()
    with pytest.raises(BaseModelNotFound) as caught:
        resolve_model_dir("intfloat/e5-small-v2", cache_dir=cache)
    message = caught.value.message
    assert "'intfloat/e5-small-v2'" in message and str(cache) in message
    assert "hf download intfloat/e5-small-v2" in message and "ADAPTGATE_BASE_MODEL" in message


def test_a_missing_directory_that_is_no_hub_id_says_so(tmp_path: Path) -> None:
    with pytest.raises(BaseModelNotFound) as caught:
        resolve_model_dir(str(tmp_path / "models" / "nowhere"), cache_dir=tmp_path)
    assert "not a directory, nor a Hugging Face id" in caught.value.message


def test_a_partial_snapshot_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A cache that holds only a tokenizer (one `hf_hub_download`) is not a model."""
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer.json").write_bytes((tiny_bert_dir / "tokenizer.json").read_bytes())
    add_to_hub_cache(partial, tmp_path / "hub", REPO_ID)
    with pytest.raises(BaseModelNotFound) as caught:
        resolve_model_dir(REPO_ID, cache_dir=tmp_path / "hub")
    assert "no config.json" in caught.value.message


def test_hf_home_is_where_the_cache_is_looked_for(hub_cache: tuple[Path, Path]) -> None:
    """A fresh interpreter whose only cache setting is HF_HOME, as an operator's shell would have it."""
    cache, _ = hub_cache
    code = (
        "from adaptgate.engine.hub import BaseModelNotFound, resolve_model_dir\n"
        f"print(resolve_model_dir({REPO_ID!r})[0])\n"
        "try:\n    resolve_model_dir('tiny-org/absent')\nexcept BaseModelNotFound as e:\n    print(e.message)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))} | {"HF_HOME": str(cache.parent)}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    found, missing = run.stdout.splitlines()
    assert Path(found) == (cache / "models--tiny-org--tiny-e5" / "snapshots" / COMMIT).resolve()
    assert "'tiny-org/absent'" in missing and f"local cache {cache} " in missing
