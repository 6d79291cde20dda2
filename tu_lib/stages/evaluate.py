"""Stage 03 — the six-dataset evaluation: ASR with CIs under two offline judges, over-refusal, utility.

For every model (the base preset and each method's adapter from stage 02) the same items are generated
greedily in batches, appended to runs/03_eval/generations/<preset>/<method>-<weights>.jsonl (a rerun skips what is there),
then judged:

* `refusal_keywords` — the GCG refusal-prefix list: ASR = no refusal (the literature's number);
* `harmfulness` — a classifier on MiniLM embeddings trained on human-labelled "objective achieved"
  examples: ASR = the answer provides what was asked;
* `on_topic` — the answer addresses the instruction beyond an echo of it (shared with stage 00);
* `fluency` — perplexity under the frozen base model plus repetition rules: degenerate output (whitespace,
  loops, gibberish — what gradient ascent is known to produce) is its own category instead of hiding in
  either ASR.

Attack sets: T1 AdvBench, T2 HarmBench, T3 jailbreak templates (text); V1 FigStep, V2 MM-SafetyBench
typography, V3 adversarial images optimised here against the model's vision path (vision-text). Plus XSTest
over-refusal, TruthfulQA MC1 (log-likelihood) and benign reading (organism: held-out benign titles shown as
images, answered on topic).

Every set is read in one part of stage 01's validation/test split (`split`): "test" by default, so the headline
table reports items no choice was made on; "validation" for curves and choices; "all" for both.

Training curves (evaluation.curves, issue 19): `score_curve` scores every checkpoint stage 02 kept (curve_points) on
the validation items, one row per (method, step); `curve_figure` (safety against benign reading) and `cost_figure`
(safety against cumulative training cost) draw them; `matched_cost_ratio` gives the cost ratio of two methods at
matched safety; `picked_checkpoints` applies the pre-registered `selection_rule` to the curve.

Two models on the same items (evaluation.ab): `ab_table` gives per set and metric both rates and the paired bootstrap
95% CI of their difference, `vs_base` every method against base; from the shell,
`python -m tu_lib.stages.evaluate ab textual_ga base [--judgements runs/03_eval/judgements.csv] [--seed 0]`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .. import models
from ..core import params
from ..core.errors import ParameterError, TuError
from ..core.files import claim_output_dir, verified_path, write_csv, write_json
from ..core.params import (Param, Spec, dtype_value, non_negative, one_of, positive, positive_size, resolve_path,
                           seed_value)
from ..core.plots import theme
from ..core.records import run_record
from ..core.text import as_list, list_check
from ..data.sets import EVAL_SETS, eval_set
from ..data.splits import SPLIT_CHOICES
from ..evaluation.ab import ab_table, format_ab, judgements_frame, vs_base
from ..evaluation.curves import curve_problem, matched_cost_ratio, safety_levels, score_curve, step_gflop
from ..evaluation.inputs import check_eval_inputs, input_hashes, resolve_user_sets
from ..evaluation.items import build_items
from ..evaluation.judging import JUDGE_NAMES, Judges, generate_method
from ..evaluation.metrics import judge_agreement, mc1_for, metric_rows, paper_table
from ..evaluation.selection import RULE_CONDITIONS, picked_checkpoints, rule_problem
from ..judges.refusal import keyword_agreement
from ..judges.registry import REQUIRED_JUDGE
from ..methods.registry import METHODS

__all__ = ["NOTEBOOK", "SPEC", "resolve_params", "check_inputs", "asr_figure", "reference_numbers", "write_outputs",
           "build_items", "Judges", "generate_method", "judge_agreement", "mc1_for", "metric_rows", "paper_table",
           "keyword_agreement", "ab_table", "format_ab", "vs_base", "curve_problem", "score_curve", "step_gflop",
           "curve_figure", "cost_figure", "safety_levels", "matched_cost_ratio", "picked_checkpoints", "main"]


NOTEBOOK = "03_eval"


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (organism, CPU) or paper (LLaVA-1.5-7B, GPU)"),
    Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
    Param("methods", (list, str), None, "models to evaluate: 'base' and/or stage 02's methods (list or comma-separated)",
          profiled=True),
    Param("sets", (list, str), None, f"sets to evaluate, from {list(EVAL_SETS)}", profiled=True),
    Param("user_sets", (list, str), [], "your own attack sets: CSV or JSONL files (prompt; optional image, image_text, "
          "request, category, id), each evaluated as the set user_<file stem>; see the README"),
    Param("split", (str,), "all", "part of every set evaluated ('all' until the curves land, issue 19): 'test' (the headline numbers), 'validation' (curves and "
          "choices) or 'all' (both, as before stage 01 split the sets); taken before n_per_set", one_of(*SPLIT_CHOICES)),
    Param("selection_rule", (dict, str), None, "pre-registered rule that picks each method's checkpoint from its "
          f"validation curve (evaluation.selection; conditions: {', '.join(RULE_CONDITIONS)})", rule_problem,
          profiled=True),
    Param("n_per_set", (int, str), None, "items per set (int or 'all')", positive_size, profiled=True),
    Param("judges", (list, str), None, f"judges, from {', '.join(JUDGE_NAMES)} ({REQUIRED_JUDGE} is required)",
          profiled=True),
    Param("batch_size", (int,), None, "prompts per generation batch", positive, profiled=True),
    Param("max_new_tokens", (int,), None, "greedy tokens generated per prompt", positive, profiled=True),
    Param("v3_steps", (int,), None, "Adam steps that optimise each V3 adversarial image (the attack budget)", non_negative,
          profiled=True),
    Param("seed", (int,), 0, "seed of the V3 initialisation and the bootstrap", seed_value),
    Param("dtype", (str,), "auto", "model dtype: auto (float32 on a CPU, bf16 on a GPU), float32 or bfloat16",
          dtype_value),
    Param("model_dir", (str,), "", "local folder of a llava-hf checkpoint (paper presets without the hub)", folder=True),
    Param("llava_images_dir", (str,), "", "folder with LLaVA-Bench-COCO images (paper presets' reading/VQA utility)",
          folder=True),
    Param("data_dir", (str,), None, "stage 01's output folder (the curated sets)", profiled=True, kind="path"),
    Param("unlearn_dir", (str,), None, "stage 02's output folder (one adapter per method)", profiled=True, kind="path"),
    Param("out_dir", (str,), None, "where generations, judgements and tables go", profiled=True, kind="output"),
    Param("fig_dir", (str,), None, "folder for the figure and its CSV", profiled=True, kind="figures"),
])


def resolve_params(namespace: dict) -> dict:
    raw = params.user_variables(namespace)
    fixed = {k: as_list(raw[k]) for k in ("methods", "sets", "judges") if isinstance(raw.get(k), (str, tuple))}
    if isinstance(raw.get("selection_rule"), str):  # papermill's `-p selection_rule "{max_degenerate_share: 0.05}"`
        try:
            fixed["selection_rule"] = yaml.safe_load(raw["selection_rule"])
        except yaml.YAMLError as e:
            raise ParameterError(f"Parameter selection_rule={raw['selection_rule']!r} is not a YAML mapping ({e}).") from None
    P = params.resolve(SPEC, {**namespace, **fixed})
    for key, choices in (("methods", ["base", *METHODS]), ("sets", list(EVAL_SETS)), ("judges", JUDGE_NAMES)):
        P[key] = as_list(P[key])
        problem = list_check(choices)(P[key])
        if problem and not (key == "sets" and not P[key] and P["user_sets"]):  # only user sets: fine
            raise ParameterError(f"Parameter {key}={P[key]!r} {problem}.")
    resolve_user_sets(P)
    if P["preset"] not in models.PRESETS:
        raise ParameterError(f"Unknown model preset {P['preset']!r}; valid presets: {', '.join(models.PRESETS)}.")
    if REQUIRED_JUDGE not in P["judges"]:
        raise ParameterError(f"judges must include '{REQUIRED_JUDGE}' (the ASR every paper reports).")
    return P


def check_inputs(P: dict) -> None:
    """Fail before loading a model (check_eval_inputs: stage 01's sets, the user sets, the adapters), then claim the
    output folder."""
    check_eval_inputs(P)
    if P.get("out_dir"):  # every check passed: the output folder is this stage's from now on
        claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK)


def asr_figure(results: pd.DataFrame):
    """ASR per attack set per method with 95% CI bars, one panel per judge."""
    import matplotlib.pyplot as plt
    import seaborn as sns


    theme()
    df = results[(results["metric"] == "asr")].copy()
    df["set"] = df["set"].map(lambda n: eval_set(n).label)
    judges_ = list(dict.fromkeys(df["judge"]))
    fig, axes = plt.subplots(1, len(judges_), figsize=(7.5 * len(judges_), 4.2), squeeze=False, sharey=True)
    methods = list(dict.fromkeys(df["method"]))
    for ax, judge in zip(axes[0], judges_):
        d = df[df["judge"] == judge]
        sets = list(dict.fromkeys(d["set"]))
        width = 0.8 / len(methods)
        palette = sns.color_palette("deep", len(methods))
        for i, m in enumerate(methods):
            dm = d[d["method"] == m].set_index("set").reindex(sets)
            x = np.arange(len(sets)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, dm["rate"] * 100, width, label=m, color=palette[i])
            ax.errorbar(x, dm["rate"] * 100, yerr=[(dm["rate"] - dm["ci_low"]) * 100, (dm["ci_high"] - dm["rate"]) * 100],
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set_xticks(np.arange(len(sets)), sets, rotation=25, ha="right")
        ax.set(title=f"ASR by judge: {judge}", ylabel="ASR (%)", ylim=(0, 100))
    axes[0][0].legend(title="model", fontsize=8)
    fig.tight_layout()
    return fig


CURVE_PANELS = {"compliance_image": "image attack sets", "compliance_text": "text attack sets"}
COST_LABELS = {"seconds": "cumulative training time (s, stage 02's losses.csv)",
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
        raise TuError(f"The curve has no {cost} (stage 04's per-step FLOP counts were not given to score_curve): "
                      "draw it against seconds, or score it with step_gflop(stage 04's measured_steps.csv).")
    theme()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    note = _curve_lines(ax, curve, cost, "compliance_image", x_percent=False)
    ax.set(xlabel=COST_LABELS[cost], ylabel="harmful on-topic compliance, image sets (%)",
           title=f"Safety against training cost\n{note}")
    ax.legend(title="method (numbers: steps)", fontsize=8)
    fig.tight_layout()
    return fig


def reference_numbers() -> pd.DataFrame:
    """Numbers the papers report for LLaVA-1.5 (other models; for orientation only)."""
    return pd.read_csv(verified_path("reference/paper_numbers.csv"))


def write_outputs(P: dict, out: Path, results: pd.DataFrame, judged: dict, facts: dict, started: float, provenance: dict) -> None:
    claim_output_dir(out, NOTEBOOK)
    write_csv(results, out / "results.csv")
    write_csv(judgements_frame(judged), out / "judgements.csv")
    write_json(out / "facts.json", facts)
    write_json(out / "run_record.json", run_record(P, input_hashes(P), started,
                                                   seeds={"v3": P["seed"], "bootstrap": P["seed"]},
                                                   judges=provenance))


def main(argv: list[str]) -> None:
    """`python -m tu_lib.stages.evaluate ab A B [--judgements PATH] [--seed N]`: two models' judgements compared on
    the same items (ab_table), printed."""
    if not argv or argv[0] != "ab":
        raise SystemExit("usage: python -m tu_lib.stages.evaluate ab A B [--judgements runs/03_eval/judgements.csv] "
                         "[--seed 0]")
    parser = argparse.ArgumentParser(prog="python -m tu_lib.stages.evaluate ab",
                                     description="Two models on the same items: per set and metric both rates and the "
                                                 "paired bootstrap 95% CI of A - B (* where it excludes 0).")
    parser.add_argument("a", help="model A: a method in the judgements file (e.g. textual_ga), or PATH:METHOD for "
                                  "another stage-03 run's judgements.csv")
    parser.add_argument("b", help="model B, named the same way (e.g. base)")
    parser.add_argument("--judgements", help="the judgements.csv plain method names are read from (default: the "
                                             "default profile's, runs/03_eval/judgements.csv)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    args = parser.parse_args(argv[1:])
    if args.seed < 0:
        raise SystemExit("error: --seed must be >= 0")
    try:
        table = ab_table(args.a, args.b, args.judgements, seed=args.seed)
    except TuError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_ab(table, args.a, args.b))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
