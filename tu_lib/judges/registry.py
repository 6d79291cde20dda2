"""Judges by registry name."""
from __future__ import annotations

from ..core.errors import TuError
from .fluency import FluencyJudge
from .harmfulness import HarmfulnessJudge
from .llama_guard import LlamaGuardJudge
from .on_topic import OnTopicJudge
from .refusal import RefusalKeywordJudge

# ---------------------------------------------------------------------------------------------
# registry


JUDGES = {"refusal_keywords": RefusalKeywordJudge, "on_topic": OnTopicJudge, "harmfulness": HarmfulnessJudge,
          "fluency": FluencyJudge, "llama_guard": LlamaGuardJudge}


def get_judge(name: str, **kwargs):
    """A new judge by registry name (kwargs go to its constructor)."""
    if name not in JUDGES:
        raise TuError(f"Unknown judge {name!r}; known judges: {', '.join(JUDGES)}.")
    return JUDGES[name](**kwargs)
