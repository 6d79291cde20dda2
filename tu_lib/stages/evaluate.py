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

Two models on the same items (evaluation.ab): `ab_table` gives per set and metric both rates and the paired bootstrap
95% CI of their difference, `vs_base` every method against base; from the shell,
`python -m tu_lib.stages.evaluate ab textual_ga base [--judgements runs/03_eval/judgements.csv] [--seed 0]`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from .. import models
from ..core import params
from ..core.errors import ParameterError, TuError
from ..core.files import claim_output_dir, verified_path, write_csv, write_json
from ..core.params import Param, Spec, dtype_value, non_negative, positive, positive_size, resolve_path, seed_value
from ..core.plots import theme
from ..core.records import run_record
from ..core.text import as_list, list_check
from ..data.sets import EVAL_SETS, eval_set
from ..evaluation.ab import ab_table, format_ab, judgements_frame, vs_base
from ..evaluation.inputs import check_eval_inputs, input_hashes, resolve_user_sets
from ..evaluation.items import build_items
from ..evaluation.judging import JUDGE_NAMES, Judges, generate_method
from ..evaluation.metrics import judge_agreement, mc1_for, metric_rows, paper_table
from ..judges.refusal import keyword_agreement
from ..judges.registry import REQUIRED_JUDGE
from ..methods.registry import METHODS

__all__ = ["NOTEBOOK", "SPEC", "resolve_params", "check_inputs", "asr_figure", "reference_numbers", "write_outputs",
           "build_items", "Judges", "generate_method", "judge_agreement", "mc1_for", "metric_rows", "paper_table",
           "keyword_agreement", "ab_table", "format_ab", "vs_base", "main"]


NOTEBOOK = "03_eval"


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (organism, CPU) or paper (LLaVA-1.5-7B, GPU)"),
    Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
    Param("methods", (list, str), None, "models to evaluate: 'base' and/or stage 02's methods (list or comma-separated)",
          profiled=True),
    Param("sets", (list, str), None, f"sets to evaluate, from {list(EVAL_SETS)}", profiled=True),
    Param("user_sets", (list, str), [], "your own attack sets: CSV or JSONL files (prompt; optional image, image_text, "
          "request, category, id), each evaluated as the set user_<file stem>; see the README"),
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
