"""Argument checks every judge shares."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import TuError

# ---------------------------------------------------------------------------------------------
# helpers


def as_str_list(values, what: str) -> list[str]:
    """A list of strings; a bare string or a non-string element is an error (a NaN answer would
    otherwise be judged silently)."""
    if isinstance(values, str):
        raise TuError(f"{what} must be a sequence of strings, not a single string; wrap it in a list.")
    out = list(values)
    bad = [i for i, v in enumerate(out) if not isinstance(v, str)]
    if bad:
        raise TuError(f"{what} must all be strings; {len(bad)} are not (first at position {bad[0]}: "
                      f"{type(out[bad[0]]).__name__}). Replace missing generations with \"\" explicitly.")
    return out


def paired(first, answers, what: str) -> tuple[list[str], list[str]]:
    """Two string lists of equal length (one answer per instruction / prompt)."""
    first, answers = as_str_list(first, what), as_str_list(answers, "answers")
    if len(first) != len(answers):
        raise TuError(f"{len(first)} {what} but {len(answers)} answers; pass one answer per {what[:-1]}.")
    return first, answers


def check_card(d: dict, name: str) -> None:
    if not isinstance(d, dict) or d.get("name") != name:
        got = d.get("name") if isinstance(d, dict) else type(d).__name__
        raise TuError(f"Not a {name!r} judge card (name {got!r}).")


def model_label(model) -> str:
    """A short name for a judge's version string: the model's folder name, else its model type."""
    src = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return Path(src).name if src else model.config.model_type
