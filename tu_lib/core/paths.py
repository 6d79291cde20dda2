"""Where things live: the clone, its vendored data, run outputs and the re-creatable cache."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # tu_lib/core/paths.py -> the clone


def repo_root() -> Path:
    return REPO_ROOT


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The vendored data folder: an explicit override, else $TU_DATA_DIR, else <repo>/data."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("TU_DATA_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


def runs_dir() -> Path:
    env = os.environ.get("TU_RUNS_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "runs"


# ---------------------------------------------------------------------------------------------
# backbone


def cache_dir() -> Path:
    """Where derived, re-creatable files live ($TU_CACHE_DIR, default ~/.cache/tu)."""
    return Path(os.environ.get("TU_CACHE_DIR", Path.home() / ".cache" / "tu")).expanduser()
