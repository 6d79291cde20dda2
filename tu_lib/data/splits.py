"""Validation and test parts of every evaluation and utility set, so that curves and every choice made on them (which
checkpoint, which threshold) are made on items the headline numbers never use: stage 01 labels each item, stages 03
and 05 read one part (`split`: "test" by default, "validation", or "all" for every item as before the split).

The labels are assigned on a set's whole pool, in pool order (assign_splits), because a profile's set is a prefix of
its pool: a smaller profile's items then carry the same labels as in a larger one's, and any prefix holds about half of
each category in each part.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..core.errors import TuError
from ..core.files import read_jsonl
from .sets import stage01_file

SPLITS = ("validation", "test")
SPLIT_CHOICES = (*SPLITS, "all")  # what stages 03 and 05 take; "all": both parts, as before stage 01 split them


def assign_splits(categories: Iterable) -> list[str]:
    """One label per item, in pool order: within each category the items alternate between validation and test, so
    every prefix of the pool holds each category's items in both parts (±1). A category's first item goes to the part
    that holds fewer items so far (validation on a tie), so the parts stay balanced overall too, and the first two
    items of any pool fall in different parts: every set of two or more items has both. A pure function of the pool
    order, which stage 01's seed fixes."""
    counts = dict.fromkeys(SPLITS, 0)
    last: dict[str, str] = {}
    labels = []
    for category in map(str, categories):  # str: a missing category (NaN) is one category, not one per item
        if category in last:
            label = SPLITS[1 - SPLITS.index(last[category])]
        else:
            label = SPLITS[0] if counts[SPLITS[0]] <= counts[SPLITS[1]] else SPLITS[1]
        last[category] = label
        counts[label] += 1
        labels.append(label)
    return labels


def select_split(rows: list[dict], split: str, source: str) -> list[dict]:
    """The rows of one part (in their order), or all of them for "all". Rows without a label (stage 01's output from
    before the split) are refused with what to do, unless every row is wanted."""
    if split not in SPLIT_CHOICES:
        raise TuError(f"split={split!r} must be one of {', '.join(map(repr, SPLIT_CHOICES))}.")
    if split == "all":
        return list(rows)
    unlabelled = sum(r.get("split") not in SPLITS for r in rows)
    if unlabelled:
        raise TuError(f"{source}: {unlabelled} of {len(rows)} items carry no validation/test split (stage 01's output "
                      "from before the split): rerun notebook 01 (`papermill notebooks/01_data.ipynb runs/01_data.ipynb`"
                      ", or `make reproduce`), or pass `-p split all` to evaluate every item as before.")
    return [r for r in rows if r["split"] == split]


def split_rows(data_dir, name: str, split: str) -> list[dict]:
    """One part of stage 01's set `name` (its file in data_dir/sets)."""
    path: Path = stage01_file(data_dir, name)
    return select_split(read_jsonl(path), split, str(path))
