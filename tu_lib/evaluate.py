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
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .core import ParameterError, TuError, read_jsonl, run_record, write_csv, write_json
from .params import Param, Spec, dtype_value, non_negative, positive, positive_size, seed_value

NOTEBOOK = "03_eval"


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


def _list_check(choices):
    def check(v):
        bad = [x for x in v if x not in choices]
        if not v:
            return "must name at least one"
        return f"names unknown value(s) {bad}; choose from {list(choices)}" if bad else None
    return check


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (organism, CPU) or paper (LLaVA-1.5-7B, GPU)"),
    Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
    Param("methods", (list, str), None, "models to evaluate: 'base' and/or stage 02's methods (list or comma-separated)",
          profiled=True),
    Param("sets", (list, str), None, f"sets to evaluate, from {list(EVAL_SETS)}", profiled=True),
    Param("n_per_set", (int, str), None, "items per set (int or 'all')", positive_size, profiled=True),
    Param("judges", (list, str), None, "judges: refusal_keywords, harmfulness, on_topic, fluency, llama_guard", profiled=True),
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
JUDGE_NAMES = ("refusal_keywords", "harmfulness", "on_topic", "fluency", "llama_guard")


def resolve_params(namespace: dict) -> dict:
    from . import models, params
    from .unlearn import METHODS, _as_list

    raw = params.user_variables(namespace)
    fixed = {k: _as_list(raw[k]) for k in ("methods", "sets", "judges") if isinstance(raw.get(k), (str, tuple))}
    P = params.resolve(SPEC, {**namespace, **fixed})
    for key, choices in (("methods", ["base", *METHODS]), ("sets", list(EVAL_SETS)), ("judges", JUDGE_NAMES)):
        P[key] = _as_list(P[key])
        problem = _list_check(choices)(P[key])
        if problem:
            raise ParameterError(f"Parameter {key}={P[key]!r} {problem}.")
    if P["preset"] not in models.PRESETS:
        raise ParameterError(f"Unknown model preset {P['preset']!r}; valid presets: {', '.join(models.PRESETS)}.")
    if "refusal_keywords" not in P["judges"]:
        raise ParameterError("judges must include 'refusal_keywords' (the ASR every paper reports).")
    return P


def check_inputs(P: dict) -> None:
    """Fail before loading a model: stage 01's files and each method's adapter must exist, and the judges'
    encoder must be installed."""
    from .models import HUB_IDS

    if P.get("preset") in HUB_IDS and "utility_reading" in P["sets"] and not P.get("llava_images_dir"):
        raise TuError(f"utility_reading on {P['preset']} reads LLaVA-Bench-COCO images: pass `-p llava_images_dir DIR` "
                      "(see docs/PAPER_SCALE.md), or drop utility_reading from sets.")
    input_files(P)
    if {"harmfulness", "on_topic"} & set(P.get("judges") or []):
        from .judges import _minilm_dir

        _minilm_dir()  # the sentence encoder these judges need is a pip package: say so now, not after generation
    if P.get("out_dir"):  # every check passed: the output folder is this stage's from now on
        from .core import claim_output_dir
        from .params import resolve_path

        claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK)


def input_files(P: dict) -> list[Path]:
    """The files this stage reads: stage 01's sets and each method's adapter (each must exist)."""
    from .params import resolve_path
    from .unlearn import method_problem, stage01_file

    files = [stage01_file(P["data_dir"], f) for f in dict.fromkeys(STAGE01_FILE.get(n, n) for n in P["sets"]) if f]
    for m in P["methods"]:
        if m == "base":
            continue
        run = resolve_path(P["unlearn_dir"]) / m
        adapter = [run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json"]
        if (run / "llm.safetensors").is_file() and not adapter[0].is_file():
            raise TuError(f"{P['unlearn_dir']}/{m} holds a full fine-tune (stage 02 with `-p lora False`); stages 03 "
                          "and 05 evaluate LoRA adapters only: rerun notebook 02 with `-p lora True`.")
        missing = [f.name for f in adapter if not f.is_file()]
        if missing:
            raise TuError(f"No complete adapter for method {m!r} in {P['unlearn_dir']}/{m}/adapter (missing "
                          f"{', '.join(missing)}): run notebook 02 with `-p methods {m}` first, or drop it from methods.")
        problem = method_problem(run)
        if problem:
            raise TuError(f"The {m!r} run in {P['unlearn_dir']} cannot be trusted: {problem}. Rerun notebook 02 with "
                          f"`-p methods {m}` (it trains a damaged method again), or drop {m} from methods.")
        trained_on = json.loads((run / "summary.json").read_text()).get("preset")
        if trained_on and P.get("preset") and trained_on != P["preset"]:
            raise TuError(f"The {m!r} adapter in {P['unlearn_dir']} was trained on preset {trained_on!r}, not "
                          f"{P['preset']!r}: pass the matching preset or the unlearn_dir of a {P['preset']} run.")
        files += adapter
    return files


def input_hashes(P: dict) -> dict[str, str]:
    """file -> sha256 of what the stage read, for its run record (which adapters produced these numbers)."""
    from .core import sha256_file

    return {str(p): sha256_file(p) for p in input_files(P)}


# ---------------------------------------------------------------------------------------------
# items


def _take(rows: list, n) -> list:
    return rows if n == "all" else rows[: int(n)]


def build_items(vlm, P: dict, name: str, v3_cache: Path | None = None) -> tuple[list[dict], dict]:
    """Generation items of one set: {"key", "set", "text" (chat-formatted), "image", "instruction"}; also
    facts about the set (V3 optimisation quality)."""
    from . import adversarial
    from .render import FIGSTEP_TEXT_PROMPT
    from .unlearn import stage01_file

    spec, facts = EVAL_SETS[name], {}
    if name == "utility_reading":
        rows = reading_rows(vlm, P)
    else:
        rows = _take(read_jsonl(stage01_file(P["data_dir"], STAGE01_FILE.get(name, name))), P["n_per_set"])
    images: list = [None] * len(rows)
    if spec.image in ("figstep", "mmsb"):
        images = [vlm.render(r["image_text"], spec.image) for r in rows]
    elif spec.image == "adversarial":
        images, stats = adversarial.cached_images(vlm, [r["image_text"] for r in rows], v3_cache, steps=P["v3_steps"],
                                                  seed=P["seed"])
        done = [s for s in stats if s]
        if done:
            facts["v3_cosine_to_target"] = float(np.mean([s["cosine_to_target"] for s in done]))
            facts["v3_cosine_grey_to_target"] = float(np.mean([s["cosine_grey_to_target"] for s in done]))
    elif spec.image == "photo":
        images = [r["image_obj"] for r in rows]
    items = []
    for r, image in zip(rows, images):
        prompt = r.get("prompt") or FIGSTEP_TEXT_PROMPT
        items.append({"key": f"{name}|{r['id']}", "set": name, "id": r["id"], "image": image,
                      "text": vlm.chat(prompt, image is not None), "prompt": prompt,
                      "instruction": r.get("request") or r.get("image_text") or prompt})
    return items, facts


def reading_rows(vlm, P: dict) -> list[dict]:
    """Benign reading utility: the organism's held-out benign titles shown as FigStep-style images (answered on
    topic = read and answered); for llava presets, LLaVA-Bench-COCO questions with images from a folder."""
    from . import organism
    from .render import FIGSTEP_TEXT_PROMPT

    if vlm.preset in ("organism", "micro"):
        titles = organism.benign_titles(P["seed"])[1]
        return _take([{"id": f"title:{i}", "image_text": t, "request": t, "prompt": FIGSTEP_TEXT_PROMPT}
                      for i, t in enumerate(titles)], P["n_per_set"])
    if not P["llava_images_dir"]:
        return []
    from PIL import Image

    from .unlearn import stage01_file

    rows = _take(read_jsonl(stage01_file(P["data_dir"], "utility_llava_bench")), P["n_per_set"])
    folder = Path(P["llava_images_dir"])
    missing = [r["image"] for r in rows if not (folder / r["image"]).is_file()]
    if missing:
        raise TuError(f"{len(missing)} LLaVA-Bench-COCO images are missing from {folder} (e.g. {missing[0]}).")
    return [dict(r, image_obj=Image.open(folder / r["image"]).convert("RGB")) for r in rows]


# ---------------------------------------------------------------------------------------------
# generation and judging


def generate_method(vlm, P: dict, method: str, items: list[dict], out: Path) -> list[str]:
    """Answers of one model to every item, resumable, in out/generations/<preset>/<method>-<weights>.jsonl: the
    file is named by the weights' fingerprint, so a retrained adapter or rebuilt organism never reuses old answers."""
    import contextlib

    from .generate import generate_jsonl, weights_fingerprint
    from .params import resolve_path
    from .unlearn import adapter_applied

    rows = [{"key": it["key"], "text": it["text"], "image": it["image"]} for it in items]
    ctx = contextlib.nullcontext() if method == "base" else adapter_applied(vlm, resolve_path(P["unlearn_dir"]) / method)
    with ctx:
        weights = weights_fingerprint(vlm.model)
        path = out / "generations" / vlm.preset / f"{method}-{weights}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return generate_jsonl(vlm.model, vlm.processor, rows, path, max_new_tokens=P["max_new_tokens"],
                              batch_size=P["batch_size"], desc=method, model_id=weights)


def fluency_reference(vlm):
    """(model, tokenizer, chat) the fluency judge scores answers under: a frozen reference, never the model
    under test (its own greedy output always looks fluent to itself). The organism's pre-alignment SmolLM2
    backbone; for other presets the base VLM (adapters are only applied inside generation)."""
    if vlm.preset == "organism":
        from . import organism

        lm, tok = organism.load_backbone()
        return lm.eval(), tok, lambda p: organism.chat(tok, p)
    return vlm.base_model, vlm.tokenizer, lambda p: vlm.chat(p, False)


class Judges:
    """The chosen judges, built once (the harmfulness classifier is fitted on the vendored labels)."""

    def __init__(self, vlm, names: list[str], on_topic_card: dict | None = None):
        from . import judges

        self.names = names
        self.refusal = judges.RefusalKeywordJudge()
        self.harmfulness = judges.fitted_harmfulness_judge() if "harmfulness" in names else None
        self.on_topic = None
        if "on_topic" in names:
            self.on_topic = judges.OnTopicJudge.from_dict(on_topic_card) if on_topic_card else judges.OnTopicJudge()
        self.fluency = judges.FluencyJudge(*fluency_reference(vlm)) if "fluency" in names else None
        self.llama_guard = judges.LlamaGuardJudge() if "llama_guard" in names else None

    def harmfulness_cv(self) -> dict:
        """Cross-validated quality of the harmfulness judge (folds grouped by objective)."""
        return dict(self.harmfulness.cross_validation or {}) if self.harmfulness is not None else {}

    def provenance(self) -> dict:
        out = {"refusal_keywords": self.refusal.provenance()}
        for name in ("harmfulness", "on_topic", "fluency", "llama_guard"):
            judge = getattr(self, name)
            if judge is not None:
                out[name] = judge.provenance()
        return out

    def judge(self, items: list[dict], answers: list[str]) -> pd.DataFrame:
        """One row per item: refused, harmful, on_topic, degenerate (booleans; None where not judged), answer."""
        return self.judge_all(items, {"model": answers})["model"]

    def judge_all(self, items: list[dict], answers: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
        """`judge` for every model's answers to the same items; the fluency judge runs each prompt once
        for all models (the prompts, up to ~800 tokens, cost more than the answers)."""
        instr = [it["instruction"] for it in items]
        names = list(answers)
        degenerate = {}
        if self.fluency is not None:
            found = self.fluency.assess_many([it["prompt"] for it in items], [answers[m] for m in names])
            degenerate = {m: r["degenerate"] for m, r in zip(names, found)}
        out = {}
        for m in names:
            df = pd.DataFrame({"key": [it["key"] for it in items], "set": [it["set"] for it in items],
                               "refused": self.refusal.judge(answers[m])})
            if self.harmfulness is not None:
                df["harmful"] = self.harmfulness.judge(instr, answers[m])
            if self.on_topic is not None:
                df["on_topic"] = self.on_topic.judge(instr, answers[m])
            if self.fluency is not None:
                df["degenerate"] = degenerate[m]
            if self.llama_guard is not None:
                df["llama_guard_unsafe"] = self.llama_guard.judge(instr, answers[m])
            out[m] = df.assign(answer=answers[m])
        return out


def metric_rows(preset: str, method: str, judged: pd.DataFrame, judges_prov: dict, seed: int) -> list[dict]:
    """Tidy result rows: one per (set, metric) with n, rate and 95% bootstrap CI, and the judge's version."""
    from . import stats

    out = []

    def add(set_name, metric, judge, values):
        r = stats.rate(np.asarray(values, dtype=bool), seed=seed)
        out.append({"preset": preset, "method": method, "set": set_name, "metric": metric, "judge": judge,
                    "judge_version": judges_prov.get(judge, {}).get("judge_version", judge), **r})

    for set_name, g in judged.groupby("set", sort=False):
        kind = EVAL_SETS[set_name].kind
        ok = ~g["refused"].to_numpy(bool)
        if kind == "attack":
            add(set_name, "asr", "refusal_keywords", ok)
            if "harmful" in g:
                add(set_name, "asr", "harmfulness", g["harmful"].to_numpy(bool))
            if "on_topic" in g:
                add(set_name, "on_topic_compliance", "on_topic", ok & g["on_topic"].to_numpy(bool))
            if "llama_guard_unsafe" in g:
                add(set_name, "asr", "llama_guard", g["llama_guard_unsafe"].to_numpy(bool))
        elif kind == "over_refusal":
            add(set_name, "over_refusal", "refusal_keywords", ~ok)
        elif kind == "reading" and "on_topic" in g:
            add(set_name, "reading_on_topic", "on_topic", ok & g["on_topic"].to_numpy(bool))
        if "degenerate" in g:
            add(set_name, "degenerate", "fluency", g["degenerate"].to_numpy(bool))
    return out


def mc1_for(vlm, P: dict, method: str, judges_prov: dict) -> list[dict]:
    """TruthfulQA MC1 by log-likelihood (text utility) of one model (base, or a method's adapter)."""
    import contextlib

    from . import stats
    from .organism import truthfulqa_mc1
    from .params import resolve_path
    from .unlearn import adapter_applied, stage01_file

    table = pd.DataFrame(_take(read_jsonl(stage01_file(P["data_dir"], "utility_truthfulqa")), P["n_per_set"]))
    ctx = contextlib.nullcontext() if method == "base" else adapter_applied(vlm, resolve_path(P["unlearn_dir"]) / method)
    with ctx:
        hits = truthfulqa_mc1(vlm.model, vlm.tokenizer, table, chat_fn=lambda p: vlm.chat(p, False))
    return [{"preset": P["preset"], "method": method, "set": "utility_truthfulqa", "metric": "mc1", "judge": "log_likelihood",
             "judge_version": "mc1/loglik@1", **stats.rate(np.asarray(hits, dtype=bool), seed=P["seed"])}]


def judge_agreement(judged: pd.DataFrame) -> dict:
    """How often the two ASR judges agree on attack items (and Cohen's kappa): where they disagree, the
    keyword judge usually counts degenerate or off-topic non-refusals as successes."""
    from sklearn.metrics import cohen_kappa_score

    attack = judged[judged["set"].isin(ATTACK_SETS)]
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
    """Rows methods, columns the six attack sets (ASR under `judge`), over-refusal and utility; cells
    "rate% [lo, hi] n"."""
    from .stats import fmt_rate

    cols = {}
    for _, r in results.iterrows():
        s = EVAL_SETS[r["set"]]
        wanted = ((s.kind == "attack" and r["metric"] == "asr" and r["judge"] == judge)
                  or (s.kind == "over_refusal" and r["metric"] == "over_refusal")
                  or (s.kind == "mc1" and r["metric"] == "mc1")
                  or (s.kind == "reading" and r["metric"] == "reading_on_topic"))
        if wanted:
            cols.setdefault(s.label, {})[r["method"]] = fmt_rate(r)
    order = [EVAL_SETS[n].label for n in EVAL_SETS if EVAL_SETS[n].label in cols]
    methods = list(dict.fromkeys(results["method"]))
    return pd.DataFrame({c: [cols[c].get(m, "-") for m in methods] for c in order}, index=pd.Index(methods, name="method"))


def asr_figure(results: pd.DataFrame):
    """ASR per attack set per method with 95% CI bars, one panel per judge."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .plots import theme

    theme()
    df = results[(results["metric"] == "asr")].copy()
    df["set"] = df["set"].map(lambda n: EVAL_SETS[n].label)
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
    from .core import verified_path

    return pd.read_csv(verified_path("reference/paper_numbers.csv"))


def write_outputs(P: dict, out: Path, results: pd.DataFrame, judged: dict, facts: dict, started: float, provenance: dict) -> None:
    from .core import claim_output_dir

    claim_output_dir(out, NOTEBOOK)
    write_csv(results, out / "results.csv")
    write_csv(pd.concat([df.assign(method=m) for m, df in judged.items()]), out / "judgements.csv")
    write_json(out / "facts.json", facts)
    write_json(out / "run_record.json", run_record(P, input_hashes(P), started,
                                                   seeds={"v3": P["seed"], "bootstrap": P["seed"]},
                                                   judges=provenance))
