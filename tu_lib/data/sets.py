"""The curated sets stages 02-05 read from stage 01's output folder, and how each is evaluated (label, kind, image).

A set is one registry entry. `EVAL_SETS` holds the built-in sets and never changes; the sets a user brings (CSV or
JSONL files, `tu_lib.data.user_sets`) get their entries per run from `eval_sets(user_sets)`, named `user_<stem>`, so
nothing global changes between runs. `eval_set(name)` finds the entry of any set name a results table holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..core.errors import ParameterError, TuError
from ..core.params import resolve_path


@dataclass(frozen=True)
class EvalSet:
    name: str
    label: str  # column name in the paper-style table
    kind: str  # "attack", "over_refusal", "reading", "mc1"
    image: str | None = None  # None (text), "figstep", "mmsb", "adversarial", "photo", "user" (per row, from the file)
    path: str | None = None  # a user set's file (None for the built-in sets, which stage 01 writes)


EVAL_SETS = {s.name: s for s in [
    EvalSet("t1_advbench", "T1 AdvBench", "attack"),
    EvalSet("t2_harmbench", "T2 HarmBench", "attack"),
    EvalSet("t3_jailbreak", "T3 jailbreak", "attack"),
    EvalSet("v1_figstep", "V1 FigStep", "attack", "figstep"),
    EvalSet("v2_mmsb_typo", "V2 MM-SB typo", "attack", "mmsb"),
    EvalSet("v3_adversarial", "V3 adv. image", "attack", "adversarial"),
    EvalSet("xstest_safe", "XSTest over-refusal", "over_refusal"),
    EvalSet("utility_truthfulqa", "TruthfulQA MC1", "mc1"),
    EvalSet("utility_reading", "benign reading", "reading", "figstep"),
]}
ATTACK_SETS = [n for n, s in EVAL_SETS.items() if s.kind == "attack"]  # the built-in attack sets
STAGE01_FILE = {"v3_adversarial": "v3_prompts", "utility_reading": None}
USER_PREFIX = "user_"  # no built-in set name starts with it


def stage01_file(data_dir, name: str) -> Path:
    path = resolve_path(str(data_dir)) / "sets" / f"{name}.jsonl"
    if not path.is_file():
        raise TuError(f"{path} is missing: run stage 01 first (`papermill notebooks/01_data.ipynb runs/01_data.ipynb`, "
                      f"or `make reproduce`), or point data_dir at its output folder.")
    return path


# ---------------------------------------------------------------------------------------------
# user sets: one entry per file, built per run


def user_set_name(path: str | Path) -> str:
    """The set name of a user's file: `user_` + its stem in lower case, runs of other characters than a-z, 0-9 and _
    as one `_` (`My prompts.csv` -> `user_my_prompts`)."""
    slug = re.sub(r"[^a-z0-9_]+", "_", Path(path).stem.lower()).strip("_")
    if not slug:
        raise ParameterError(f"user set {str(path)!r}: its file name gives no set name (it needs a letter or digit "
                             "before the extension); rename the file, e.g. to my_prompts.csv.")
    return USER_PREFIX + slug


def is_user_set(name: str) -> bool:
    return name.startswith(USER_PREFIX)


def user_set_entry(name: str, path: str | None = None) -> EvalSet:
    """A user set's entry: an attack set, labelled `user: <stem>`, its images (if any) given per row by its file."""
    return EvalSet(name, f"user: {name[len(USER_PREFIX):]}", "attack", "user", path)


def eval_sets(user_sets: Iterable[str | Path] = ()) -> dict[str, EvalSet]:
    """The registry of one run: the built-in sets, then one entry per user file (a new dict; EVAL_SETS is untouched).
    Two files that would share a set name are refused."""
    registry = dict(EVAL_SETS)
    for path in user_sets:
        name = user_set_name(path)
        if name in registry:
            raise ParameterError(f"user sets {registry[name].path!r} and {str(path)!r} would both be the set {name!r} "
                                 "(a set is named after its file): rename one of the files.")
        registry[name] = user_set_entry(name, str(path))
    return registry


def eval_set(name: str) -> EvalSet:
    """The entry of a set name found in result rows or judgements: a built-in set, or a user set (`user_...`)."""
    if name in EVAL_SETS:
        return EVAL_SETS[name]
    if is_user_set(name):
        return user_set_entry(name)
    raise TuError(f"Unknown set {name!r}: not one of {list(EVAL_SETS)} and not a user set (user_...).")


def is_attack(name: str) -> bool:
    return eval_set(name).kind == "attack"
