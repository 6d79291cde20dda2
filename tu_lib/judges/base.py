"""What every judge is to the stages: one interface, and one registry entry that says how to build it, which column of
judgements.csv it writes and which metrics that column gives on each kind of set.

A judge is an object with `name`, `version`, `judge(instructions, answers) -> bool array` and `provenance()`. The
first argument is the instruction each answer responds to (the request of an attack item; judges that do not need it
ignore it), or, for judges whose entry says `reads="prompt"`, the prompt text the model was shown. A judge that can
score several models' answers to the same items at once (cheaper when the prompts cost more than the answers) also
has `judge_many(first, answer_lists) -> list of bool arrays`.

Adding a judge: one file with the class and its `ENTRY`, one line in registry.py, and its test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import pandas as pd


class Judge(Protocol):
    name: str
    version: str

    def judge(self, instructions: Sequence[str] | None, answers: Sequence[str]) -> np.ndarray: ...

    def provenance(self) -> dict: ...


@dataclass(frozen=True)
class JudgeContext:
    """What a judge may need to be built for one evaluation: the model under test (a frozen reference LM is derived
    from it, never the model itself) and the organism card's calibrated on-topic judge, when there is one."""

    vlm: Any = None
    on_topic_card: dict | None = None


Metrics = Callable[[str, pd.DataFrame], list[tuple[str, np.ndarray]]]


@dataclass(frozen=True)
class JudgeEntry:
    """A judge as stages 03 and 05 use it.

    `cls`: the judge's class (get_judge builds it with explicit arguments). `column`: the judgements.csv column it writes (booleans). `metrics(kind, judged)`: the (metric, per-item booleans)
    rows its column gives for one set of `kind` ("attack", "over_refusal", "reading", "mc1"), where `judged` holds
    every judge's columns for that set (a metric may combine them: on-topic compliance is not refused and on topic).
    `reads`: "instruction" or "prompt", what `judge`'s first argument is. `doc`: one line for parameter help."""

    name: str
    cls: type
    column: str
    metrics: Metrics
    doc: str
    build: Callable[[JudgeContext], Judge] | None = None  # None: the class with its defaults
    reads: str = "instruction"

    def make(self, ctx: JudgeContext) -> Judge:
        return self.build(ctx) if self.build is not None else self.cls()


def column(judged: pd.DataFrame, name: str) -> np.ndarray:
    return judged[name].to_numpy(bool)


def attack_rate(metric: str, value: Callable[[pd.DataFrame], np.ndarray]) -> Metrics:
    """The metrics of a judge that only measures attack sets: `metric` is `value(judged)` on attack items."""
    return lambda kind, judged: [(metric, value(judged))] if kind == "attack" else []
