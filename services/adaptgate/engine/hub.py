"""The base model by Hugging Face id (`org/name`), found in the local Hugging Face cache, never downloaded.

The gateway starts the same with or without network and serves the files an operator put in the cache
(`hf download`), not whatever the Hub holds at start time. Kept apart from engine.model so that the
lookup needs huggingface_hub only, not torch.
"""

from __future__ import annotations

from pathlib import Path

from adaptgate.errors import FailedPrecondition


class BaseModelNotFound(FailedPrecondition):
    """The base model setting names neither a directory nor a model in the local Hugging Face cache."""


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_dir(model: str | Path, cache_dir: Path | None = None) -> tuple[Path, str]:
    """The model's directory, and the Hugging Face id it was found by ("" for a directory).

    Anything that is not an existing directory is taken for a Hugging Face id and looked up in the
    local cache only (`local_files_only`: no request leaves the machine, whatever HF_HUB_OFFLINE says).
    """
    if Path(model).is_dir():
        return Path(model), ""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    model_id = str(model)
    cache = cache_dir or hub_cache_dir()
    try:
        snapshot = snapshot_download(model_id, cache_dir=cache, local_files_only=True)
    except HFValidationError as exc:
        raise BaseModelNotFound(
            f"base model {model_id!r} is not a directory, nor a Hugging Face id (org/name); "
            "set ADAPTGATE_BASE_MODEL (--base-model) to a model directory or a Hugging Face id"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise BaseModelNotFound(
            f"base model {model_id!r} is not a directory, and no complete copy of the Hugging Face model "
            f"{model_id} is in the local cache {cache} (HF_HUB_CACHE, else HF_HOME/hub); the gateway never "
            f"downloads: fetch it first with `hf download {model_id}` under the same HF_HOME/HF_HUB_CACHE, "
            "or set ADAPTGATE_BASE_MODEL (--base-model) to the model's directory"
        ) from exc
    if not (Path(snapshot) / "config.json").exists():
        raise BaseModelNotFound(
            f"the Hugging Face cache {cache} holds only part of {model_id} (no config.json in {snapshot}); "
            f"fetch the whole model with `hf download {model_id}`, or set ADAPTGATE_BASE_MODEL to a model directory"
        )
    return Path(snapshot), model_id
