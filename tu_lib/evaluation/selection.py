"""The pre-registered rule that picks one checkpoint per unlearning method from its validation curve.

Which point of a method's training curve goes into the headline table is a choice, and a choice made after seeing
the test numbers would flatter whichever method it is made for. So the rule is written in the profile before any
curve is seen, is applied to every method alike, and reads validation numbers only; the run record then holds the
rule, the step it picked and why (select_checkpoint's reasons).

A rule is a mapping of conditions (RULE_CONDITIONS), e.g. {"min_benign_reading_vs_base": 0.9,
"max_degenerate_share": 0.05}. The pick is the *last* checkpoint that meets every condition, even when an earlier one
failed (a curve may dip and recover: the rule asks how far training can go, not where it first stumbled); when none
meets them, the base model (step 0) is kept.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..core.errors import TuError
from ..core.params import portable_path, resolve_path
from ..methods.run import curve_checkpoints


@dataclass(frozen=True)
class Condition:
    column: str  # the curve's column it reads (a validation rate in [0, 1])
    relative: bool  # True: the bound is a multiple of the base model's (step 0) value
    minimum: bool  # True: the value must be at least the bound; False: at most
    label: str


RULE_CONDITIONS = {
    "min_benign_reading_vs_base": Condition("benign_reading", True, True, "benign reading"),
    "max_degenerate_share": Condition("degenerate_share", False, False, "degenerate share"),
}
CURVE_KEYS = ("method", "step")  # a curve: one row per method and step, step 0 being the base model
TOLERANCE = 1e-9  # a value exactly at its bound passes, whatever the floating-point product 0.9 x base rounds to


def rule_problem(rule) -> str | None:
    """None for a usable rule; else what is wrong with it (the text of a ParameterError or TuError)."""
    example = "e.g. {'min_benign_reading_vs_base': 0.9, 'max_degenerate_share': 0.05}"
    if not isinstance(rule, dict) or not rule:
        return f"must be a mapping of at least one condition, {example}"
    unknown = sorted(set(rule) - set(RULE_CONDITIONS))
    if unknown:
        return f"names unknown condition(s) {unknown}; the conditions are {sorted(RULE_CONDITIONS)}"
    for key, bound in rule.items():
        number = isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound)
        if not number or bound < 0 or (not RULE_CONDITIONS[key].relative and bound > 1):
            return (f"sets {key}={bound!r}: it must be a number ≥ 0" +
                    ("" if RULE_CONDITIONS[key].relative else " and ≤ 1 (a share)"))
    return None


def check_curve(curve: pd.DataFrame, rule: dict) -> None:
    """Refuse a rule or curve the selection cannot read: a bad rule, a missing column, a repeated (method, step), an
    empty value, or a method without its step 0 (the base model its relative bounds refer to)."""
    problem = rule_problem(rule)
    if problem:
        raise TuError(f"The selection rule {rule!r} {problem}.")
    needed = list(CURVE_KEYS) + [RULE_CONDITIONS[k].column for k in rule]
    missing = [c for c in needed if c not in curve.columns]
    if missing:
        raise TuError(f"The curve lacks column(s) {missing} that the selection rule reads (it has {list(curve.columns)}).")
    if curve.duplicated(list(CURVE_KEYS)).any():
        twice = curve[curve.duplicated(list(CURVE_KEYS))].iloc[0]
        raise TuError(f"The curve holds method {twice['method']!r} at step {twice['step']} twice: one row per checkpoint.")
    empty = curve[needed].isna().any(axis=1)
    if empty.any():
        row = curve[empty].iloc[0]
        raise TuError(f"The curve has no value for {[c for c in needed if pd.isna(row[c])]} at method {row['method']!r}, "
                      f"step {row['step']}: score every checkpoint before selecting.")
    no_base = sorted(set(curve["method"]) - set(curve.loc[curve["step"] == 0, "method"]))
    if no_base:
        raise TuError(f"The curve of {no_base} has no step 0 (the base model), which the rule's bounds refer to.")


def _failures(row, base, rule: dict) -> list[str]:
    """What one checkpoint fails of the rule, each as a readable comparison (empty when it passes)."""
    out = []
    for key, bound in rule.items():
        c = RULE_CONDITIONS[key]
        value = float(row[c.column])
        limit = bound * float(base[c.column]) if c.relative else bound
        if (value < limit - TOLERANCE) if c.minimum else (value > limit + TOLERANCE):
            scale = f" ({bound:g} x base {float(base[c.column]):.1%})" if c.relative else ""
            out.append(f"{c.label} {value:.1%} {'<' if c.minimum else '>'} {limit:.1%}{scale}")
    return out


def select_checkpoint(curve: pd.DataFrame, rule: dict) -> dict[str, dict]:
    """Per method of `curve` (columns method, step and those the rule reads, validation rates in [0, 1]; step 0 is
    the base model): {"step": the picked step, "reason": why, in words, "failed": {step: [failed conditions]}}.
    The pick is the last checkpoint (step > 0) meeting every condition of `rule`, else step 0."""
    check_curve(curve, rule)
    picks = {}
    for method, rows in curve.groupby("method", sort=False):
        rows = rows.sort_values("step")
        base = rows[rows["step"] == 0].iloc[0]
        failed = {int(r["step"]): f for _, r in rows[rows["step"] > 0].iterrows() if (f := _failures(r, base, rule))}
        passing = [int(s) for s in rows.loc[rows["step"] > 0, "step"] if int(s) not in failed]
        step = passing[-1] if passing else 0
        why_not = "; ".join(f"step {s}: {', '.join(f)}" for s, f in failed.items())
        if passing:
            reason = f"step {step} is the last checkpoint that meets {rule}" + (f"; failed: {why_not}" if failed else "")
        elif failed:
            reason = f"no checkpoint meets {rule} ({why_not}): the base model (step 0) is kept"
        else:
            reason = "the curve has no checkpoint after step 0: the base model (step 0) is kept"
        picks[str(method)] = {"step": step, "reason": reason, "failed": failed}
    return picks


def picked_checkpoints(curve: pd.DataFrame, rule: dict, unlearn_dir) -> dict[str, dict]:
    """What stage 03 evaluates on test for each method of a validation curve (evaluation.curves.score_curve): the
    checkpoint `rule` picks (select_checkpoint), as {"step", "checkpoint": the folder models.adapter_applied takes, or
    None for the base model, "reason", "failed"}, ready for the run record. The folder is looked up in the method's
    own run under `unlearn_dir` (verified by curve_checkpoints), so a curve scored on another run is refused."""
    picks = select_checkpoint(curve, rule)
    out = {}
    for method, pick in picks.items():
        folders = dict(curve_checkpoints(Path(unlearn_dir) / method))
        if pick["step"] not in folders:
            raise TuError(f"{method}'s curve picks step {pick['step']}, but its run in {unlearn_dir} kept steps "
                          f"{sorted(folders)}: the curve was scored on another run; score it again.")
        folder = folders[pick["step"]]
        out[method] = {"step": pick["step"], "checkpoint": None if folder is None else portable_path(folder),
                       "reason": pick["reason"], "failed": {str(k): v for k, v in pick["failed"].items()}}
    return out


def named_checkpoints(value) -> dict[str, int]:
    """Stage 03's `checkpoints` parameter, method -> step (papermill passes a YAML string): {} for None. Raises
    TuError with what a usable value looks like."""
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for k, v in value.items()):
        raise TuError(f"checkpoints={value!r} must map methods to steps ≥ 0, e.g. {{textual_ga: 80}} (0: the base "
                      "model); the steps a run kept are listed in its summary.json under curve.")
    return dict(value)


def check_named_checkpoints(named: dict[str, int], methods, unlearn_dir) -> None:
    """Every named checkpoint is one of `methods` and a step its run kept (checked before any model loads)."""
    for method, step in named.items():
        if method == "base" or method not in methods:
            raise TuError(f"checkpoints names {method!r}, which is not an evaluated method ({list(methods)}).")
        steps = [s for s, _ in curve_checkpoints(Path(unlearn_dir) / method)]
        if step not in steps:
            raise TuError(f"checkpoints asks for {method} at step {step}, but its run in {unlearn_dir} kept steps "
                          f"{steps}: name one of them, or rerun notebook 02 with more curve_points.")


def evaluated_checkpoints(curve: pd.DataFrame | None, rule: dict, methods, unlearn_dir,
                          named: dict[str, int] | None = None) -> dict[str, dict]:
    """The checkpoint stage 03 evaluates on test for each unlearning method of `methods`: the rule's pick on the
    validation `curve` (picked_checkpoints), or, where `named` gives a step, that step (the pick kept in the reason);
    without a curve, stage 02's final weights. Each {"step", "checkpoint" (folder, None for the base model),
    "reason", "failed"}."""
    named = named or {}
    methods = [m for m in methods if m != "base"]
    if curve is not None and len(curve):
        picks = picked_checkpoints(curve[curve["method"].isin(methods)], rule, unlearn_dir)
    else:
        picks = {}
        for m in methods:
            step, folder = curve_checkpoints(Path(unlearn_dir) / m)[-1]
            picks[m] = {"step": step, "checkpoint": portable_path(folder), "failed": {},
                        "reason": "no training curve was scored (curve_n_per_set 0): stage 02's final weights"}
    for method, step in named.items():
        folder = dict(curve_checkpoints(Path(unlearn_dir) / method))[step]
        was = picks.get(method, {}).get("step")
        picks[method] = {"step": step, "checkpoint": None if folder is None else portable_path(folder),
                         "failed": picks.get(method, {}).get("failed", {}),
                         "reason": f"named by the checkpoints parameter (the selection rule picked step {was})"}
    return {m: picks[m] for m in methods}


def picked_folders(eval_dir, unlearn_dir, methods) -> dict[str, Path | None]:
    """method -> the weights stage 03 evaluated it at (its picks.json in `eval_dir`): a checkpoint folder, or None
    for a pick at step 0 (the base model). Methods stage 03 did not pick, or no picks.json, keep stage 02's final
    weights. A pick outside this stage 02 run (`unlearn_dir`) is refused: it would mix two runs."""
    path = Path(eval_dir) / "picks.json" if eval_dir else None
    picks = (json.loads(path.read_text(encoding="utf-8")).get("checkpoints") or {}) if path and path.is_file() else {}
    out = {}
    for m in methods:
        pick = picks.get(m)
        if pick is None:
            out[m] = Path(unlearn_dir) / m
            continue
        folder = None if pick["step"] == 0 else resolve_path(pick["checkpoint"])
        if folder is not None and Path(unlearn_dir).resolve() / m not in (folder.resolve(), *folder.resolve().parents):
            raise TuError(f"{path} picks {m} at {pick['checkpoint']}, outside this stage 02 run ({unlearn_dir}): pass "
                          "the eval_dir of a stage 03 run on the same unlearn_dir, or eval_dir '' for final weights.")
        out[m] = folder
    return out
