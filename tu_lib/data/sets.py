"""The curated sets stages 02-05 read from stage 01's output folder, and how each is evaluated (label, kind, image)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import TuError
from ..core.params import resolve_path


@dataclass(frozen=True)
class EvalSet:
    name: str
    label: str  # column name in the paper-style table
    kind: str  # "attack", "over_refusal", "reading", "mc1"
    image: str | None = None  # None (text), "figstep", "mmsb", "adversarial", "photo"


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
ATTACK_SETS = [n for n, s in EVAL_SETS.items() if s.kind == "attack"]
STAGE01_FILE = {"v3_adversarial": "v3_prompts", "utility_reading": None}


def stage01_file(data_dir, name: str) -> Path:
    path = resolve_path(str(data_dir)) / "sets" / f"{name}.jsonl"
    if not path.is_file():
        raise TuError(f"{path} is missing: run stage 01 first (`papermill notebooks/01_data.ipynb runs/01_data.ipynb`, "
                      f"or `make reproduce`), or point data_dir at its output folder.")
    return path
