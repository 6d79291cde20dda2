"""Small text and list helpers shared by every layer (prompt normalisation, papermill's comma lists)."""
from __future__ import annotations

import re
import unicodedata

# ---------------------------------------------------------------------------------------------
# text


_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalise_prompt(text: str) -> str:
    """Canonical form used to prove that no prompt serves two roles: NFKC, lower case, no punctuation,
    single spaces. Two prompts that differ only in case, punctuation or spacing count as the same."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def as_list(value):
    """papermill's -p passes strings: accept "a,b" as well as a YAML/Python list."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value)


def list_check(choices):
    def check(v):
        bad = [x for x in v if x not in choices]
        if not v:
            return "must name at least one"
        return f"names unknown value(s) {bad}; choose from {list(choices)}" if bad else None
    return check


# ---------------------------------------------------------------------------------------------
# items


def take(rows: list, n) -> list:
    return rows if n == "all" else rows[: int(n)]
