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
from ..evaluation.curves import (cost_figure, curve_figure, curve_problem, matched_cost_ratio, run_checkpoints,
                                 safety_levels, score_curve, step_gflop)
from ..evaluation.inputs import check_eval_inputs, input_hashes, resolve_user_sets
from ..evaluation.items import build_items
from ..evaluation.judging import JUDGE_NAMES, Judges, forward_tape, generate_method, generate_models
from ..evaluation.metrics import judge_agreement, mc1_for, metric_rows, paper_table
from ..evaluation.selection import (RULE_CONDITIONS, check_named_checkpoints, evaluated_checkpoints, named_checkpoints,
                                    picked_checkpoints, rule_problem)
from ..judges.refusal import keyword_agreement
from ..judges.registry import REQUIRED_JUDGE
from ..methods.registry import METHODS

__all__ = ["NOTEBOOK", "SPEC", "resolve_params", "check_inputs", "asr_figure", "reference_numbers", "write_outputs",
           "build_items", "Judges", "generate_method", "generate_models", "judge_agreement", "mc1_for", "metric_rows", "paper_table",
           "keyword_agreement", "ab_table", "format_ab", "vs_base", "curve_problem", "score_curve", "step_gflop",
           "curve_figure", "cost_figure", "safety_levels", "matched_cost_ratio", "picked_checkpoints", "training_curve",
           "checkpoints_to_evaluate", "evaluated_checkpoints", "evaluated_weights", "generate_picked", "mc1_picked", "picks_frame", "with_vs_base", "vs_base_table", "main"]


NOTEBOOK = "03_eval"


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (organism, CPU) or paper (LLaVA-1.5-7B, GPU)"),
    Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
    Param("methods", (list, str), None, "models to evaluate: 'base' and/or stage 02's methods (list or comma-separated)",
          profiled=True),
    Param("sets", (list, str), None, f"sets to evaluate, from {list(EVAL_SETS)}", profiled=True),
    Param("user_sets", (list, str), [], "your own attack sets: CSV or JSONL files (prompt; optional image, image_text, "
          "request, category, id), each evaluated as the set user_<file stem>; see the README"),
    Param("split", (str,), "test", "part of every set evaluated: 'test' (the headline numbers), 'validation' (the "
          "choices' part) or 'all' (both, as before stage 01 split the sets); taken before n_per_set",
          one_of(*SPLIT_CHOICES)),
    Param("selection_rule", (dict, str), None, "pre-registered rule that picks each method's checkpoint from its "
          f"validation curve (evaluation.selection; conditions: {', '.join(RULE_CONDITIONS)})", rule_problem,
          profiled=True),
    Param("checkpoints", (dict, str), None, "method -> step evaluated instead of the rule's pick, e.g. {textual_ga: "
          "80} (0: the base model; steps a run kept: its summary.json)", profiled=True),
    Param("n_per_set", (int, str), None, "items per set (int or 'all')", positive_size, profiled=True),
    Param("curve_n_per_set", (int,), None, "validation items per set scored at every checkpoint stage 02 kept (its "
          "training curves; 0: none, each method's final weights are evaluated)", non_negative, profiled=True),
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
    try:
        fixed["checkpoints"] = named_checkpoints(raw.get("checkpoints"))
    except TuError as e:
        raise ParameterError(str(e)) from None
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
    check_named_checkpoints(P.get("checkpoints") or {}, P["methods"], resolve_path(P["unlearn_dir"]))
    if P.get("curve_n_per_set") and not curve_problem(P):
        run_checkpoints(P)  # every curve point's weights verified now, not after the test generations
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


def training_curve(vlm, P: dict, judge_set, out: Path) -> pd.DataFrame | None:
    """Every checkpoint stage 02 kept, scored on P["curve_n_per_set"] validation items per set (score_curve); None
    when curve_n_per_set is 0 or the parameters cannot give a curve (the reason is printed)."""
    if not P["curve_n_per_set"]:
        return None
    problem = curve_problem(P)
    if problem:
        print(f"no training curve: {problem}")
        return None
    return score_curve(vlm, {**P, "n_per_set": P["curve_n_per_set"]}, judge_set, out)


def checkpoints_to_evaluate(P: dict, curve: pd.DataFrame | None) -> dict[str, dict]:
    """method -> the checkpoint its test numbers come from (evaluation.selection.evaluated_checkpoints): the
    selection rule's pick on the validation curve unless the `checkpoints` parameter names a step."""
    return evaluated_checkpoints(curve, P["selection_rule"], P["methods"], resolve_path(P["unlearn_dir"]),
                                 P["checkpoints"])


def evaluated_weights(picks: dict[str, dict], method: str) -> tuple[str, Path | None]:
    """(the model whose weights to load, the checkpoint folder) for `method` under `picks`: a method picked at step
    0 is the base model (generated once, cached as base), any other pick its checkpoint's folder."""
    pick = picks.get(method)
    if method == "base" or (pick is not None and pick["step"] == 0):
        return "base", None
    return method, (resolve_path(pick["checkpoint"]) if pick else None)


def generate_picked(vlm, P: dict, items: list[dict], out: Path, picks: dict[str, dict]) -> dict[str, list[str]]:
    """Every model of P["methods"] answering `items` at the checkpoint `picks` holds for it (evaluated_weights), by
    generate_models (the layers below the adapters prefilled once per item)."""
    return generate_models(vlm, P, {m: evaluated_weights(picks, m) for m in P["methods"]}, items, out)


def mc1_picked(vlm, P: dict, provenance: dict, picks: dict[str, dict]) -> dict[str, list[dict]]:
    """method -> its TruthfulQA MC1 rows (mc1_for) at the checkpoint `picks` holds for it, labelled with the method,
    for every method of P["methods"] (one forward_tape: the layers below the adapters scored once)."""
    tape, rows = forward_tape(P), {}
    for method in P["methods"]:
        model, folder = evaluated_weights(picks, method)
        rows[method] = [{**row, "method": method} for row in mc1_for(vlm, P, model, provenance, folder=folder, tape=tape)]
    return rows


def picks_frame(picks: dict[str, dict]) -> pd.DataFrame:
    """The picks as a table for printing: method, step, reason."""
    return pd.DataFrame([{"method": m, "step": p["step"], "reason": p["reason"]} for m, p in picks.items()],
                        columns=["method", "step", "reason"])


def with_vs_base(results: pd.DataFrame, judged: dict, seed: int) -> pd.DataFrame:
    """results.csv's rows with the A/B columns of every method against base on the same items (evaluation.ab.vs_base:
    the difference, its paired-bootstrap 95% CI, whether the CI excludes 0); rows without a per-item judgement (MC1)
    or without base keep NaN there."""
    if "base" not in judged or len(judged) < 2:
        return results
    ab = vs_base(judgements_frame(judged), seed=seed).drop(columns=["note"])
    return results.merge(ab, on=["method", "set", "metric", "judge"], how="left")


def vs_base_table(results: pd.DataFrame, judge: str = "on_topic") -> pd.DataFrame:
    """Rows: methods; columns: sets; cells: the method's rate minus base's under `judge`, with its paired 95% CI and
    `*` where the CI excludes 0 (with_vs_base's columns)."""
    rows = results[(results["judge"] == judge) & results["vs_base"].notna()] if "vs_base" in results else results[:0]
    cell = [f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]{'*' if x else ''}" for d, lo, hi, x in
            zip(rows["vs_base"], rows["vs_base_ci_low"], rows["vs_base_ci_high"], rows["vs_base_excludes_zero"])]
    return rows.assign(cell=cell).pivot_table(index="method", columns=["set", "metric"], values="cell", aggfunc="first",
                                              sort=False)


def reference_numbers() -> pd.DataFrame:
    """Numbers the papers report for LLaVA-1.5 (other models; for orientation only)."""
    return pd.read_csv(verified_path("reference/paper_numbers.csv"))


def write_outputs(P: dict, out: Path, results: pd.DataFrame, judged: dict, facts: dict, started: float, provenance: dict,
                  curve: pd.DataFrame | None = None, picks: dict | None = None) -> None:
    """results.csv, judgements.csv, facts.json, the validation curve (curve.csv) and the checkpoints evaluated
    (picks.json, also in the run record with the rule that chose them)."""
    claim_output_dir(out, NOTEBOOK)
    write_csv(results, out / "results.csv")
    if curve is not None:
        write_csv(curve, out / "curve.csv")
    write_json(out / "picks.json", {"selection_rule": P["selection_rule"], "checkpoints": picks or {}})
    write_csv(judgements_frame(judged), out / "judgements.csv")
    write_json(out / "facts.json", facts)
    write_json(out / "run_record.json", run_record(P, input_hashes(P), started,
                                                   seeds={"v3": P["seed"], "bootstrap": P["seed"]},
                                                   judges=provenance,
                                                   checkpoints={"selection_rule": P["selection_rule"],
                                                                "picks": picks or {}}))


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
