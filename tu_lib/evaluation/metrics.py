"""Tidy result rows (n, rate, 95% bootstrap CI, judge version), TruthfulQA MC1, judge agreement, the paper table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core import stats
from ..core.stats import fmt_rate
from ..core.text import take
from ..data.sets import EVAL_SETS, eval_set, is_attack
from ..data.splits import split_rows
from ..judges.registry import JUDGES
from ..models.likelihood import continuation_logprobs
from ..models.presets.organism import chat
from .judging import method_weights


def metric_rows(preset: str, method: str, judged: pd.DataFrame, judges_prov: dict, seed: int) -> list[dict]:
    """Tidy result rows: one per (set, metric) with n, rate and 95% bootstrap CI, and the judge's version."""
    out = []

    def add(set_name, metric, judge, values):
        r = stats.rate(np.asarray(values, dtype=bool), seed=seed)
        out.append({"preset": preset, "method": method, "set": set_name, "metric": metric, "judge": judge,
                    "judge_version": judges_prov.get(judge, {}).get("judge_version", judge), **r})

    for set_name, g in judged.groupby("set", sort=False):
        for judge, metric, values in judge_metrics(eval_set(set_name).kind, g):
            add(set_name, metric, judge, values)
    return out


def judge_metrics(kind: str, judged: pd.DataFrame):
    """(judge, metric, per-item booleans) of every judge whose column `judged` holds, in the registry's order, as
    each judge's entry derives them for items of `kind` (one set, or several sets of one kind pooled)."""
    for entry in JUDGES.values():
        if entry.column in judged:
            for metric, values in entry.metrics(kind, judged):
                yield entry.name, metric, values


def mc1_for(vlm, P: dict, method: str, judges_prov: dict, folder: Path | None = None, tape=None) -> list[dict]:
    """TruthfulQA MC1 by log-likelihood (text utility) of one model (base, or a method's adapter: its final weights,
    or those of a curve point's `folder`), on the P["split"] part of the set (its first P["n_per_set"] questions).
    `tape`: judging.forward_tape(P), shared by the calls of several models on the same P (the same numbers, the
    layers below the adapters computed once)."""
    table = pd.DataFrame(take(split_rows(P["data_dir"], "utility_truthfulqa", P["split"]), P["n_per_set"]))
    with method_weights(vlm, P, method, folder):
        hits = truthfulqa_mc1(vlm.model, vlm.tokenizer, table, chat_fn=lambda p: vlm.chat(p, False), tape=tape)
    return [{"preset": P["preset"], "method": method, "set": "utility_truthfulqa", "metric": "mc1", "judge": "log_likelihood",
             "judge_version": "mc1/loglik@1", **stats.rate(np.asarray(hits, dtype=bool), seed=P["seed"])}]


def judge_agreement(judged: pd.DataFrame) -> dict:
    """How often the two ASR judges agree on attack items (and Cohen's kappa): where they disagree, the
    keyword judge usually counts degenerate or off-topic non-refusals as successes."""
    from sklearn.metrics import cohen_kappa_score

    attack = judged[[is_attack(n) for n in judged["set"]]]  # built-in and user attack sets
    if "harmful" not in attack or attack.empty:
        return {}
    a, b = ~attack["refused"].to_numpy(bool), attack["harmful"].to_numpy(bool)
    kappa = float(cohen_kappa_score(a, b)) if len(set(a)) > 1 or len(set(b)) > 1 else float("nan")
    return {"n": int(len(a)), "agreement": float(np.mean(a == b)), "kappa": kappa,
            "keyword_success_but_not_harmful": float(np.mean(a & ~b)),
            "harmful_but_keyword_refusal": float(np.mean(~a & b))}


# ---------------------------------------------------------------------------------------------
# tables and figures


def paper_table(results: pd.DataFrame, judge: str = "refusal_keywords") -> pd.DataFrame:
    """Rows methods, columns the six attack sets (ASR under `judge`), over-refusal and utility, then the user sets
    (`user: <stem>`, attack sets too); cells "rate% [lo, hi] n"."""
    cols = {}
    for _, r in results.iterrows():
        s = eval_set(r["set"])
        wanted = ((s.kind == "attack" and r["metric"] == "asr" and r["judge"] == judge)
                  or (s.kind == "over_refusal" and r["metric"] == "over_refusal")
                  or (s.kind == "mc1" and r["metric"] == "mc1")
                  or (s.kind == "reading" and r["metric"] == "reading_on_topic"))
        if wanted:
            cols.setdefault(s.label, {})[r["method"]] = fmt_rate(r)
    users = [eval_set(n).label for n in dict.fromkeys(results["set"]) if n not in EVAL_SETS]
    order = [c for c in [EVAL_SETS[n].label for n in EVAL_SETS] + users if c in cols]
    methods = list(dict.fromkeys(results["method"]))
    return pd.DataFrame({c: [cols[c].get(m, "-") for m in methods] for c in order}, index=pd.Index(methods, name="method"))


@torch.inference_mode()
def truthfulqa_mc1(model, tok, table, chat_fn=None, batch_size: int = 8, tape=None) -> list[int]:
    """MC1 by log-likelihood: 1 where the best answer out-scores every incorrect answer (summed log-probs
    of the answer's own tokens after the formatted question; each question is run once for all its
    options). `chat_fn(prompt)` formats the question (default: the organism's ChatML)."""
    prompts, options = [], []
    for _, row in table.iterrows():
        choices = [row["answer"]] + [a.strip() for a in row["incorrect_answers"].split(";") if a.strip()]
        prompt = chat_fn(row["prompt"]) if chat_fn else chat(tok, row["prompt"])
        prompts.append(tok(prompt, add_special_tokens=False)["input_ids"])
        options.append([tok(c, add_special_tokens=False)["input_ids"] for c in choices])
    scores = continuation_logprobs(model, prompts, options, batch_size=batch_size, pad_id=tok.pad_token_id, tape=tape)
    return [int(np.argmax([lp.astype(np.float64).sum() for lp in row]) == 0) for row in scores]
