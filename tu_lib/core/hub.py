"""The model hub, for users who have one: whether it is switched off, and one snapshot download that says what to
do when a model is not available (every hub model tu loads goes through here)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import HubModelUnavailable


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them only at import)."""
    truthy = {"1", "on", "yes", "true"}
    if any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]  # never *.bin (pickles)


def hub_snapshot(hub_id: str, how_to_provide: str) -> Path:
    """Download (or, offline, find in the HF cache) the snapshot folder; errors name the hub id and end with
    `how_to_provide` (where a local copy can be put instead)."""
    from huggingface_hub import snapshot_download

    is_offline = offline()
    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_FILES, local_files_only=is_offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception as exc:  # huggingface_hub/httpx raise many types; each means "not available"
        why = ("HF_HUB_OFFLINE is set and the model is not in the local HF cache" if is_offline
               else f"the hub could not be reached or refused the download ({type(exc).__name__}: {exc})")
        raise HubModelUnavailable(f"Model {hub_id} is not available: {why}. " + how_to_provide) from exc


def local_copy(model_id: str, local_dir, how_to_provide: str) -> Path | None:
    """A local copy of hub model `model_id`: the explicit `local_dir` (which must hold a config.json), else
    $TU_MODEL_DIR/<id> or $TU_MODEL_DIR/<name> if one holds a config.json, else None (use the hub)."""
    if local_dir is not None:
        path = Path(local_dir).expanduser()
        if not (path / "config.json").is_file():
            raise HubModelUnavailable(f"local_dir {path} has no config.json, so it is not a copy of {model_id}. "
                                      + how_to_provide)
        return path
    root = os.environ.get("TU_MODEL_DIR")
    if root:
        for cand in (Path(root).expanduser() / model_id, Path(root).expanduser() / model_id.split("/")[-1]):
            if (cand / "config.json").is_file():
                return cand
    return None
