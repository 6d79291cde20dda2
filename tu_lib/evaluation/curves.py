"""Training curves: every kept checkpoint of every unlearning method scored on the validation part of the sets, and
the cost at which two methods reach the same safety.

One end point per method cannot tell a method that does not work from one stopped too early or run too long; a curve
can. score_curve scores each checkpoint of stage 02's runs (methods.curve_checkpoints; step 0 is the base model, shared
by every method) with stage 03's own items, cached generations, judges and metric definitions, and returns one row per
(method, step) (CURVE_COLUMNS): the safety, utility and fluency rates with n and a 95% bootstrap CI, beside the
cumulative training cost at that step. Curves are always scored on validation items: the choices made on them (the
selection rule, evaluation.selection) must not see the test items the headline table reports.

matched_cost_ratio reads, off two methods' curves, the cumulative cost at which each first reaches a safety level,
interpolating linearly between the two checkpoints that bracket it (and saying so): paper A's "the same safety at a
fraction of the cost", measured instead of asserted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core import stats
from ..core.errors import ParameterError, TuError
from ..core.params import portable_path, resolve_path
from ..core.plots import theme
from ..data.sets import ATTACK_SETS, EVAL_SETS
from ..methods.run import curve_checkpoints
from .items import build_items
from .judging import forward_tape, generate_models
from .metrics import judge_metrics, mc1_for

TEXT_ATTACK_SETS = tuple(n for n in ATTACK_SETS if EVAL_SETS[n].image is None)
IMAGE_ATTACK_SETS = tuple(n for n in ATTACK_SETS if EVAL_SETS[n].image is not None)
# curve column -> (the sets pooled into it, the judge, its metric). User sets are left out of the pools: whether an
# item is image-borne is decided per row there, and a curve compares methods on the same built-in sets.
POOLS = {
    "compliance_text": (TEXT_ATTACK_SETS, "on_topic", "on_topic_compliance"),  # harmful on-topic compliance
    "compliance_image": (IMAGE_ATTACK_SETS, "on_topic", "on_topic_compliance"),
    "keyword_asr_text": (TEXT_ATTACK_SETS, "refusal_keywords", "asr"),
    "keyword_asr_image": (IMAGE_ATTACK_SETS, "refusal_keywords", "asr"),
    "benign_reading": (("utility_reading",), "on_topic", "reading_on_topic"),
    "over_refusal": (("xstest_safe",), "refusal_keywords", "over_refusal"),
}
RATES = (*POOLS, "degenerate_share", "mc1")  # each with _n, _ci_low, _ci_high beside it
COSTS = ("seconds", "gflop")  # cumulative training cost at the step (0 at step 0)
CURVE_COLUMNS = ("method", "step", "checkpoint", *(f"{r}{s}" for r in RATES for s in ("", "_n", "_ci_low", "_ci_high")),
                 *COSTS)
CURVE_JUDGES = {"on_topic": "harmful on-topic compliance and benign reading",
                "fluency": "the degenerate share (which the selection rule reads)"}


def curve_problem(P: dict) -> str | None:
    """None when stage 03's parameters can score a curve; else what is missing (checked before a model loads)."""
    if not [m for m in P["methods"] if m != "base"]:
        return f"methods={P['methods']} names no unlearning method (a curve is a method's checkpoints)"
    missing = [j for j in CURVE_JUDGES if j not in P["judges"]]
    if missing:
        return (f"judges={P['judges']} lacks {missing}: a curve needs " +
                "; ".join(f"{j} for {CURVE_JUDGES[j]}" for j in missing))
    if "utility_reading" not in P["sets"]:
        return f"sets={P['sets']} lacks utility_reading (benign reading, the utility the selection rule reads)"
    if not set(ATTACK_SETS) & set(P["sets"]):
        return f"sets={P['sets']} holds no built-in attack set (the curve's safety is pooled over them)"
    return None


def step_gflop(measured) -> dict[str, float]:
    """method -> GFLOP of one training step: the median of stage 04's counted FLOPs per step (its measured_steps.csv,
    also figures/04_cost_steps.csv: columns method and gflop), or {} for None (no counts: the curve's gflop is NaN)."""
    if measured is None:
        return {}
    table = measured if isinstance(measured, pd.DataFrame) else pd.read_csv(resolve_path(str(measured)))
    missing = [c for c in ("method", "gflop") if c not in table.columns]
    if missing:
        raise TuError(f"Stage 04's per-step counts lack column(s) {missing} (they have {list(table.columns)}): pass its "
                      "measured_steps.csv (or figures/04_cost_steps.csv).")
    return {str(m): float(g) for m, g in table.groupby("method")["gflop"].median().items()}


def cumulative_seconds(method_dir, steps) -> dict[int, float]:
    """step -> wall seconds of training up to and including that step, summed from the run's losses.csv."""
    path = Path(method_dir) / "losses.csv"
    losses = pd.read_csv(path)
    if not {"step", "seconds"} <= set(losses.columns):
        raise TuError(f"{path} lacks the step or seconds column (written by an older tu): rerun notebook 02.")
    done = losses.set_index("step")["seconds"].sort_index().cumsum()
    late = [s for s in steps if s > 0 and s not in done.index]
    if late:
        raise TuError(f"{path} logs no step {late[0]} although the run kept a checkpoint there: rerun notebook 02.")
    return {int(s): (0.0 if s == 0 else float(done[s])) for s in steps}


def _rate_columns(name: str, values, seed: int) -> dict:
    r = stats.rate(np.asarray(values, dtype=bool), seed=seed)
    return {name: r["rate"], f"{name}_n": r["n"], f"{name}_ci_low": r["ci_low"], f"{name}_ci_high": r["ci_high"]}


def checkpoint_scores(judged: pd.DataFrame, seed: int) -> dict:
    """The rate columns of one checkpoint from its judgements (one row per item, Judges.judge_all): each POOLS column
    derived by its judge's registry entry (judge_metrics) on the pooled items of its sets, and the degenerate share
    over every answer. A pool with no item has n 0 and a NaN rate."""
    out = {}
    for name, (sets, judge, metric) in POOLS.items():
        part = judged[judged["set"].isin(sets)]
        values = next((v for j, m, v in judge_metrics(EVAL_SETS[sets[0]].kind, part) if (j, m) == (judge, metric)), [])
        out.update(_rate_columns(name, values, seed))
    return {**out, **_rate_columns("degenerate_share", judged["degenerate"], seed)}


def run_checkpoints(P: dict) -> dict[str, list[tuple[int, Path | None]]]:
    """method -> its checkpoints (step, folder), base first: every run is verified (curve_checkpoints) before any
    generation, so a damaged run stops the curve at once."""
    return {m: curve_checkpoints(resolve_path(P["unlearn_dir"]) / m) for m in P["methods"] if m != "base"}


def score_curve(vlm, P: dict, judge_set, out, gflop_per_step: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per (method, step) of stage 02's training curves (CURVE_COLUMNS), scored on the validation part of
    P["sets"] (its first P["n_per_set"] items) whatever P["split"] says. Step 0 is the base model, generated and
    judged once and shared by every method. Each checkpoint's answers are cached under out/generations/ by its
    weights (the final step reuses stage 03's); the fluency judge scores all checkpoints in one pass. `judge_set`:
    stage 03's Judges; `gflop_per_step`: step_gflop's counts (a method without one gets a NaN gflop)."""
    problem = curve_problem(P)
    if problem:
        raise ParameterError(f"A training curve cannot be scored: {problem}.")
    missing = [j for j in CURVE_JUDGES if j not in judge_set.judges]
    if missing:
        raise TuError(f"The judges passed to score_curve lack {missing}: build them from the same P (Judges(vlm, "
                      "P['judges'])).")
    V, out = {**P, "split": "validation"}, Path(out)
    points = run_checkpoints(V)
    seconds = {m: cumulative_seconds(resolve_path(V["unlearn_dir"]) / m, [s for s, _ in pts]) for m, pts in points.items()}
    items = [it for name in V["sets"] if name != "utility_truthfulqa"
             for it in build_items(vlm, V, name, v3_cache=out / "v3_images")[0]]
    models = {"base": ("base", 0, None), **{f"{m}@{s}": (m, s, folder) for m, pts in points.items()
                                            for s, folder in pts if s}}
    answers = generate_models(vlm, V, {label: (m, folder) for label, (m, _, folder) in models.items()}, items, out,
                              desc="{label} (validation)")
    judged = judge_set.judge_all(items, answers)
    scores = {label: checkpoint_scores(judged[label], V["seed"]) for label in models}
    if "utility_truthfulqa" in V["sets"]:  # stage 03's MC1 row of each checkpoint, its columns renamed
        tape = forward_tape(V)  # the layers below the adapters scored once for all checkpoints
        for label, (m, _, folder) in models.items():
            mc1 = mc1_for(vlm, V, m, judge_set.provenance(), folder=folder, tape=tape)[0]
            scores[label].update({f"mc1{s}": mc1[k] for s, k in (("", "rate"), ("_n", "n"), ("_ci_low", "ci_low"),
                                                                 ("_ci_high", "ci_high"))})
    gflop = gflop_per_step or {}
    rows = [{"method": m, "step": s, "checkpoint": "base" if folder is None else portable_path(folder),
             **scores[f"{m}@{s}" if s else "base"], "seconds": seconds[m][s],
             "gflop": gflop.get(m, np.nan) * s if s else 0.0}  # step 0, the base model, is every method's first point
            for m, pts in points.items() for s, folder in pts]
    return pd.DataFrame(rows).reindex(columns=[c for c in CURVE_COLUMNS if c in rows[0]])


# ---------------------------------------------------------------------------------------------
# the cost at matched safety


def _method_curve(curve: pd.DataFrame, method: str, safety: str, cost: str) -> pd.DataFrame:
    missing = [c for c in ("method", "step", safety, cost) if c not in curve.columns]
    if missing:
        raise TuError(f"The curve lacks column(s) {missing} (it has {list(curve.columns)}).")
    rows = curve[curve["method"] == method].sort_values("step")
    if rows.empty:
        raise TuError(f"The curve has no method {method!r} (it has {sorted(set(curve['method']))}).")
    if rows["step"].iloc[0] != 0:
        raise TuError(f"The curve of {method!r} does not start at step 0 (the base model).")
    if rows[safety].isna().any():
        raise TuError(f"The curve of {method!r} has no {safety} at step(s) {rows.loc[rows[safety].isna(), 'step'].tolist()}: "
                      "score it on sets that give that rate.")
    return rows


def safety_levels(curve: pd.DataFrame, methods, safety: str = "compliance_image",
                  fractions=(0.25, 0.5, 0.75)) -> list[float]:
    """Safety levels to match the methods at: `fractions` of the way from the base model's value (step 0) down to
    the lowest value any of `methods` reaches, so a level the weaker method never reaches shows as such."""
    base = float(_method_curve(curve, methods[0], safety, "step")[safety].iloc[0])
    best = min(float(_method_curve(curve, m, safety, "step")[safety].min()) for m in methods)
    return [base - f * (base - best) for f in fractions]


def first_reach(curve: pd.DataFrame, method: str, level: float, safety: str = "compliance_image",
                cost: str = "seconds") -> dict:
    """The cumulative `cost` at which `method`'s curve first comes down to `safety` <= `level` (lower is safer):
    between the last checkpoint above the level and the first at or below it, safety is taken as linear in cost.
    {"cost": value or NaN, "how": in words, "reason": why it is NaN ("" otherwise)}."""
    rows = _method_curve(curve, method, safety, cost)
    y, c, steps = rows[safety].to_numpy(float), rows[cost].to_numpy(float), rows["step"].to_numpy(int)
    reached = np.flatnonzero(y <= level)
    if not reached.size:
        low = int(np.argmin(y))
        return {"cost": np.nan, "how": "",
                "reason": f"{method} never reaches {level:.1%} (its lowest is {y[low]:.1%}, at step {steps[low]})"}
    i = int(reached[0])
    if i == 0:
        return {"cost": 0.0, "how": "the base model (step 0) is already at the level", "reason": ""}
    if np.isnan(c[i - 1]) or np.isnan(c[i]):
        return {"cost": np.nan, "how": "", "reason": f"{method} has no {cost} at step {steps[i - 1]} or {steps[i]}"}
    t = (y[i - 1] - level) / (y[i - 1] - y[i])  # in (0, 1]: the level lies between the two points
    return {"cost": float(c[i - 1] + t * (c[i] - c[i - 1])),
            "how": f"interpolated linearly between steps {steps[i - 1]} and {steps[i]}", "reason": ""}


def matched_cost_ratio(curve: pd.DataFrame, method_a: str, method_b: str, levels=None,
                       safety: str = "compliance_image", cost: str = "seconds") -> pd.DataFrame:
    """Per safety level (default: safety_levels of the two methods), the cumulative cost at which each method first
    reaches it (first_reach) and their ratio cost_a / cost_b, e.g. multimodal_ga over textual_ga: "textual unlearning
    reaches the same safety at 1/ratio of the cost". Where either method never reaches the level, or reaches it at no
    cost, the ratio is NaN and `reason` says why."""
    levels = safety_levels(curve, [method_a, method_b], safety) if levels is None else list(levels)
    rows = []
    for level in levels:
        a, b = (first_reach(curve, m, level, safety, cost) for m in (method_a, method_b))
        reason = "; ".join(r for r in (a["reason"], b["reason"]) if r)
        if not reason and b["cost"] == 0:
            reason = f"{method_b} reaches {level:.1%} at no cost (the base model already does)"
        rows.append({"safety": safety, "level": level, "cost": cost, "method_a": method_a, "method_b": method_b,
                     "cost_a": a["cost"], "cost_b": b["cost"],
                     "ratio": np.nan if reason else a["cost"] / b["cost"],
                     "how_a": a["how"], "how_b": b["how"], "reason": reason})
    return pd.DataFrame(rows)


# (multimodal, textual) pairs whose cost at matched safety paper A compares ("up to 6x")
COST_PAIRS = (("multimodal_ga", "textual_ga"), ("mm_sft", "text_sft"))


def matched_costs(curve: pd.DataFrame) -> pd.DataFrame:
    """For each (multimodal, textual) pair of COST_PAIRS on the curve, at three safety levels (a quarter, half and
    three quarters of the way from the base model to the lowest image-set compliance either reaches): the cost at
    which each first reaches the level, interpolated linearly between the checkpoints around it, and their ratio,
    in seconds and in GFLOP (matched_cost_ratio)."""
    present = set(curve["method"])
    parts = [matched_cost_ratio(curve, a, b, cost=c) for a, b in COST_PAIRS if {a, b} <= present
             for c in ("gflop", "seconds")]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ---------------------------------------------------------------------------------------------
# costs from stage 04 and figures


def costed_curve(curve: pd.DataFrame, per_step: pd.DataFrame) -> pd.DataFrame:
    """The curve with its cost columns recomputed from stage 04's measurements (`per_step`: its summary.csv, columns
    method, seconds_median, gflop_per_step): cumulative seconds = median seconds per step x step, GFLOP = counted
    GFLOP per step x step. Stage 04 times every method alike on a quiet machine, while stage 02's logged seconds
    carry whatever else the machine was doing. A method stage 04 did not time gets NaN."""
    missing = [c for c in ("method", "seconds_median", "gflop_per_step") if c not in per_step.columns]
    if missing:
        raise TuError(f"Stage 04's summary lacks column(s) {missing} (it has {list(per_step.columns)}): rerun notebook 04.")
    rate = per_step.set_index("method")
    out = curve.copy()
    for column, source in (("seconds", "seconds_median"), ("gflop", "gflop_per_step")):
        out[column] = out["method"].map(rate[source]).astype(float) * out["step"]
        out.loc[out["step"] == 0, column] = 0.0
    return out


CURVE_PANELS = {"compliance_image": "image attack sets", "compliance_text": "text attack sets"}
COST_LABELS = {"seconds": "cumulative training time (s: stage 04's median seconds per step x steps)",
               "gflop": "cumulative training GFLOP (stage 04's count per step x steps)"}


def _curve_lines(ax, curve: pd.DataFrame, x: str, y: str, x_percent: bool) -> str:
    """One line per method through its checkpoints in step order (step numbers beside the points, 95% CI bars on
    y), the base model (step 0, every method's first point) as one black star; returns the panel's CI note."""
    import seaborn as sns

    scale = 100 if x_percent else 1
    methods = list(dict.fromkeys(curve["method"]))
    for colour, method in zip(sns.color_palette("deep", len(methods)), methods):
        rows = curve[curve["method"] == method].sort_values("step")
        ax.errorbar(rows[x] * scale, rows[y] * 100, yerr=[(rows[y] - rows[f"{y}_ci_low"]) * 100,
                                                          (rows[f"{y}_ci_high"] - rows[y]) * 100],
                    fmt="-o", color=colour, label=method, markersize=4, elinewidth=0.7, capsize=2)
        for _, r in rows[rows["step"] > 0].iterrows():
            ax.annotate(str(int(r["step"])), (r[x] * scale, r[y] * 100), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color=colour)
    base = curve[curve["step"] == 0].iloc[0]
    ax.plot(base[x] * scale, base[y] * 100, "k*", markersize=12, label="base (step 0)", zorder=5)
    half = np.nanmedian((curve[f"{y}_ci_high"] - curve[f"{y}_ci_low"]) / 2) * 100
    return f"bars: 95% CI, median ±{half:.0f} points, n={int(curve[f'{y}_n'].median())}"


def curve_figure(curve: pd.DataFrame):
    """Safety against utility along training (issue 19): per panel (image, then text attack sets) harmful on-topic
    compliance against benign reading, one line per method through its validation checkpoints
    (evaluation.score_curve's rows). Down is safer, right keeps more utility."""
    import matplotlib.pyplot as plt

    theme()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(6.5 * len(CURVE_PANELS), 4.8), sharex=True, squeeze=False)
    for ax, (y, label) in zip(axes[0], CURVE_PANELS.items()):
        note = _curve_lines(ax, curve, "benign_reading", y, x_percent=True)
        ax.set(xlabel="benign reading (%, validation)", ylabel="harmful on-topic compliance (%)",
               title=f"{label}\n{note}")
    axes[0][0].legend(title="method (numbers: steps)", fontsize=8)
    fig.tight_layout()
    return fig


def cost_figure(curve: pd.DataFrame, cost: str = "seconds"):
    """Safety against cumulative training cost (`cost`: "seconds" or "gflop"): image-set harmful on-topic compliance,
    one line per method; where the lines cross a safety level, their costs give matched_cost_ratio's ratio."""
    import matplotlib.pyplot as plt

    if cost not in COST_LABELS:
        raise ParameterError(f"cost={cost!r} must be one of {list(COST_LABELS)}.")
    if curve.loc[curve["step"] > 0, cost].isna().all():
        raise TuError(f"The curve has no {cost}: give it stage 04's per-step costs first (costed_curve).")
    theme()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    note = _curve_lines(ax, curve, cost, "compliance_image", x_percent=False)
    ax.set(xlabel=COST_LABELS[cost], ylabel="harmful on-topic compliance, image sets (%)",
           title=f"Safety against training cost\n{note}")
    ax.legend(title="method (numbers: steps)", fontsize=8)
    fig.tight_layout()
    return fig


