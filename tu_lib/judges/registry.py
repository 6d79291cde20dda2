"""Judges by registry name: the order is the order of judgements.csv's columns and of each set's result rows."""
from __future__ import annotations

from ..core.errors import TuError
from . import fluency, harmfulness, llama_guard, on_topic, refusal, refusal_likelihood
from .base import JudgeEntry

JUDGES: dict[str, JudgeEntry] = {e.name: e for e in [
    refusal.ENTRY,
    harmfulness.ENTRY,
    on_topic.ENTRY,
    llama_guard.ENTRY,
    fluency.ENTRY,
    refusal_likelihood.ENTRY,
]}
REQUIRED_JUDGE = "refusal_keywords"  # keyword ASR is the number every paper reports: always judged


def get_judge(name: str, **kwargs):
    """A new judge by registry name (kwargs go to its class)."""
    if name not in JUDGES:
        raise TuError(f"Unknown judge {name!r}; known judges: {', '.join(JUDGES)}.")
    return JUDGES[name].cls(**kwargs)
