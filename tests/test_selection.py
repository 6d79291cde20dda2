"""The pre-registered checkpoint rule (evaluation.selection) on hand-made validation curves: it picks what it says,
falls back to the base model, prefers the last passing checkpoint over an earlier one, and refuses what it cannot
read."""
import pandas as pd
import pytest

from tu_lib.core import ParameterError, TuError
from tu_lib.evaluation import select_checkpoint
from tu_lib.stages import evaluate

RULE = {"min_benign_reading_vs_base": 0.9, "max_degenerate_share": 0.05}


def curve(method: str, points: list[tuple[int, float, float]]) -> pd.DataFrame:
    """(step, benign reading, degenerate share) rows of one method; step 0 is the base model."""
    return pd.DataFrame([{"method": method, "step": s, "benign_reading": r, "degenerate_share": d} for s, r, d in points])


BASE = (0, 0.60, 0.00)  # 0.9 x 60% = 54% is the reading a checkpoint must keep


def test_the_last_checkpoint_meeting_both_conditions_is_picked():
    c = curve("textual_ga", [BASE, (1, 0.60, 0.0), (2, 0.58, 0.01), (4, 0.55, 0.05), (8, 0.50, 0.02), (16, 0.30, 0.40)])
    pick = select_checkpoint(c, RULE)["textual_ga"]
    assert pick["step"] == 4  # 55% >= 54% and a share of exactly 5% is allowed; step 8 reads 50%
    assert set(pick["failed"]) == {8, 16}
    assert pick["failed"][8] == ["benign reading 50.0% < 54.0% (0.9 x base 60.0%)"]
    assert len(pick["failed"][16]) == 2 and "degenerate share 40.0% > 5.0%" in pick["failed"][16]
    assert pick["reason"].startswith("step 4 is the last checkpoint that meets") and "step 8: benign reading" in pick["reason"]


def test_no_passing_checkpoint_keeps_the_base_model():
    c = curve("multimodal_ga", [BASE, (1, 0.40, 0.0), (2, 0.60, 0.20)])
    pick = select_checkpoint(c, RULE)["multimodal_ga"]
    assert pick["step"] == 0 and set(pick["failed"]) == {1, 2}
    assert "base model (step 0) is kept" in pick["reason"] and "step 2: degenerate share 20.0% > 5.0%" in pick["reason"]


def test_a_later_passing_checkpoint_wins_over_a_failing_middle_one():
    """'The last checkpoint that passes': a curve that dips at step 4 and recovers at step 8 picks step 8, not step 2
    (the rule asks how far training can go while keeping utility, not where it first stumbled)."""
    c = curve("npo", [BASE, (2, 0.59, 0.0), (4, 0.45, 0.0), (8, 0.57, 0.03)])
    pick = select_checkpoint(c, RULE)["npo"]
    assert pick["step"] == 8 and list(pick["failed"]) == [4]


def test_methods_are_judged_alike_and_separately_and_row_order_does_not_matter():
    both = pd.concat([curve("a", [(8, 0.10, 0.0), BASE, (4, 0.58, 0.0)]), curve("b", [BASE, (4, 0.50, 0.0)])])
    picks = select_checkpoint(both.sample(frac=1, random_state=0), RULE)
    assert {m: p["step"] for m, p in picks.items()} == {"a": 4, "b": 0}
    # one condition alone: only it is applied (b's step 4 keeps a 0% share)
    assert select_checkpoint(both, {"max_degenerate_share": 0.05})["b"]["step"] == 4
    # a stricter base ratio counts against the method's own base row
    assert select_checkpoint(both, {"min_benign_reading_vs_base": 0.99})["a"]["step"] == 0


@pytest.mark.parametrize("rule, message", [
    ({"min_benign_reading": 0.9}, r"unknown condition\(s\) \['min_benign_reading'\]"),
    ({}, "at least one condition"),
    ("0.9", "at least one condition"),
    ({"max_degenerate_share": 1.5}, r"max_degenerate_share=1.5: it must be a number ≥ 0 and ≤ 1"),
    ({"min_benign_reading_vs_base": -0.1}, "must be a number ≥ 0"),
    ({"min_benign_reading_vs_base": True}, "must be a number"),
])
def test_a_bad_rule_is_refused(rule, message):
    with pytest.raises(TuError, match=message):
        select_checkpoint(curve("a", [BASE, (1, 0.6, 0.0)]), rule)


@pytest.mark.parametrize("frame, message", [
    (curve("a", [BASE, (1, 0.6, 0.0)]).drop(columns="degenerate_share"), r"lacks column\(s\) \['degenerate_share'\]"),
    (curve("a", [(1, 0.6, 0.0), (2, 0.6, 0.0)]), r"\['a'\] has no step 0"),
    (curve("a", [BASE, (1, 0.6, 0.0), (1, 0.5, 0.0)]), "method 'a' at step 1 twice"),
    (curve("a", [BASE, (1, float("nan"), 0.0)]), r"no value for \['benign_reading'\] at method 'a', step 1"),
])
def test_a_curve_the_rule_cannot_read_is_refused(frame, message):
    with pytest.raises(TuError, match=message):
        select_checkpoint(frame, RULE)


def test_the_rule_is_set_in_every_profile_and_checked_with_the_parameters():
    for profile in ("smoke", "default", "paper"):
        assert evaluate.resolve_params({"profile": profile})["selection_rule"] == RULE
    assert evaluate.resolve_params({"profile": "smoke", "selection_rule": "{max_degenerate_share: 0.1}"})[
        "selection_rule"] == {"max_degenerate_share": 0.1}  # papermill's -p passes a string
    with pytest.raises(ParameterError, match=r"selection_rule=.*unknown condition"):
        evaluate.resolve_params({"profile": "smoke", "selection_rule": {"keep_best": True}})


def test_a_value_exactly_at_its_bound_passes():
    # 0.9 x 0.4 is 0.36000000000000004 in floating point: a reading of 18/50 = 0.36 meets it exactly, as 5% meets 5%
    c = curve("a", [(0, 0.4, 0.0), (1, 18 / 50, 0.05)])
    assert 0.9 * 0.4 > 18 / 50 and select_checkpoint(c, RULE)["a"]["step"] == 1
