"""Stage 05 — the representation gap and CMRM on the organism (analysis.repgap, analysis.cmrm): gap metrics by
layer, PCA grid, the alpha sweep.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import numpy as np
import torch

from .. import models
from ..analysis.cmrm import cmrm
from ..analysis.repgap import (
    CONDITIONS,
    POSITIONS,
    check_alphas,
    check_layers,
    condition_states,
    gap_table,
    meaningless_image,
    sample_shift_vectors,
    shift_vectors,
)
from ..core import params, stats
from ..core.errors import ParameterError, TuError
from ..core.files import atomic_path, claim_output_dir, read_jsonl, write_csv, write_json
from ..core.params import Param, Spec, dtype_value, one_of, positive, resolve_path, seed_value
from ..core.plots import theme
from ..core.records import run_record
from ..core.text import as_list, list_check
from ..data.sets import eval_set, is_user_set, stage01_file
from ..data.splits import SPLIT_CHOICES
from ..data.titles import benign_titles
from ..data.user_sets import read_user_set
from ..evaluation.inputs import check_eval_inputs, input_hashes, resolve_user_sets
from ..evaluation.judging import JUDGE_NAMES
from ..evaluation.metrics import metric_rows
from ..evaluation.selection import picked_folders
from ..methods.registry import METHODS
from ..models.adapters import adapter_applied
from ..models.generate import generate

__all__ = ["NOTEBOOK", "SWEEP_SETS", "BASE", "SPEC", "resolve_params", "check_inputs", "resolve_layers",
           "anchor_prompts", "gap_instructions", "method_folders", "model_context", "dataset_shift", "model_shifts", "collect_states",
           "gap_rows", "pca_rows", "grid_layers", "sweep_plan", "sweep_answers", "sweep_rows", "shift_norms",
           "layers_figure", "pca_figure", "ALPHA_PANELS", "alpha_panels", "alpha_table", "alpha_figure", "write_outputs"]


# ---------------------------------------------------------------------------------------------
# notebook 05: parameters and inputs

NOTEBOOK = "05_repgap"
SWEEP_SETS = ("v1_figstep", "v2_mmsb_typo", "utility_reading")  # stage 03's image sets: CMRM corrects image inputs
BASE = "base"


def _parsed_list(name: str, value, cast, expected: str) -> list:
    """A list parameter whose command-line strings (`-p alphas 0,0.5`) are cast to numbers."""
    try:
        return [cast(x) if isinstance(x, str) else x for x in as_list(value)]
    except ValueError:
        raise ParameterError(f"Parameter {name}={value!r} must be {expected}.") from None


def _spec():
    return Spec(NOTEBOOK, [
        Param("profile", (str,), "default", "settings profile: smoke, default (organism, CPU) or paper (LLaVA-1.5-7B, GPU)"),
        Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
        Param("methods", (list, str), None, "stage 02 methods whose hidden states are compared with the base model's",
              profiled=True),
        Param("combine_methods", (list, str), None, "stage 02 methods evaluated alone and combined with CMRM at "
              "combined_alpha ([] for none)", profiled=True),
        Param("layers", (list, str), None, "decoder layers of the gap analysis: 'all' or indices (negative from the end)",
              profiled=True),
        Param("pca_grid", (int,), None, "layers in the PCA grid (evenly spaced over `layers`)", positive, profiled=True),
        Param("position", (str,), None, "hidden-state readout: 'last' token or 'mean' over text tokens",
              one_of(*POSITIONS), profiled=True),
        Param("cmrm_layers", (list, str), None, "decoder layers CMRM corrects (paper B does not publish its choice)",
              profiled=True),
        Param("alphas", (list, str), None, "dataset-level CMRM alpha grid on the base model (numbers in [0, 2])",
              profiled=True),
        Param("sample_alphas", (list, str), None, "sample-level CMRM alphas on the base model ([] to skip)", profiled=True),
        Param("combined_alpha", (float,), None, "dataset-level alpha combined with each of combine_methods", profiled=True),
        Param("meaningless", (str,), None, "CMRM's meaningless image: blank (white) or noise (uniform RGB)",
              one_of("blank", "noise"), profiled=True),
        Param("anchor_size", (int,), None, "anchor prompts of the dataset-level shift: half training-side harmful "
              "questions (stage 01's forget set), half training-side benign titles", positive, profiled=True),
        Param("n_gap", (int,), None, "instructions per group (harmful, benign) in the gap analysis", positive,
              profiled=True),
        Param("sets", (list, str), None, f"alpha-sweep sets, from {list(SWEEP_SETS)}", profiled=True),
        Param("user_sets", (list, str), [], "your own image attack sets for the sweep: CSV or JSONL files whose every "
              "row has an image or image_text (as notebook 03's user_sets; see the README)"),
        Param("split", (str,), "test", "part of every sweep set: 'test', 'validation' or 'all' (both, as before stage "
              "01 split the sets); taken before n_per_set", one_of(*SPLIT_CHOICES)),
        Param("n_per_set", (int,), None, "items per set in the alpha sweep", positive, profiled=True),
        Param("judges", (list, str), None, f"judges, from {', '.join(JUDGE_NAMES)} (refusal_keywords is required; llama_guard needs a GPU)",
              profiled=True),
        Param("batch_size", (int,), None, "prompts per batch (generation and hidden states)", positive, profiled=True),
        Param("max_new_tokens", (int,), None, "greedy tokens generated per prompt", positive, profiled=True),
        Param("seed", (int,), 0, "seed of the noise images, the probes' folds and the bootstrap", seed_value),
        Param("dtype", (str,), "auto", "model dtype: auto (float32 on a CPU, bf16 on a GPU), float32 or bfloat16",
              dtype_value),
        Param("model_dir", (str,), "", "local folder of a llava-hf checkpoint (paper presets without the hub)",
              folder=True),
        Param("llava_images_dir", (str,), "", "folder with LLaVA-Bench-COCO images (paper presets' reading utility)",
              folder=True),
        Param("data_dir", (str,), None, "stage 01's output folder", profiled=True, kind="path"),
        Param("unlearn_dir", (str,), None, "stage 02's output folder (one adapter per method)", profiled=True, kind="path"),
        Param("eval_dir", (str,), None, "stage 03's output folder: each method is analysed at the checkpoint its "
              "picks.json names ('' or no picks.json: stage 02's final weights)", profiled=True, kind="path"),
        Param("out_dir", (str,), None, "where tables, judgements and the run record go", profiled=True, kind="output"),
        Param("fig_dir", (str,), None, "folder for the figures and their CSVs", profiled=True, kind="figures"),
    ])


SPEC = _spec()


def resolve_params(namespace: dict) -> dict:
    """Typed, checked parameters: unknown methods, sets, judges, alphas outside [0, 2] and malformed layer lists
    fail here, before any model is loaded (layer ranges are checked against the model as soon as it is)."""
    raw = params.user_variables(namespace)
    fixed = {k: as_list(raw[k]) for k in ("methods", "combine_methods", "sets", "judges", "cmrm_layers", "alphas",
                                           "sample_alphas") if isinstance(raw.get(k), (str, tuple))}
    if isinstance(raw.get("layers"), (str, tuple)) and raw["layers"] != "all":
        fixed["layers"] = as_list(raw["layers"])
    if isinstance(raw.get("combined_alpha"), int) and not isinstance(raw.get("combined_alpha"), bool):
        fixed["combined_alpha"] = float(raw["combined_alpha"])
    P = params.resolve(SPEC, {**namespace, **fixed})
    for key, choices, may_be_empty in (("methods", list(METHODS), True), ("combine_methods", list(METHODS), True),
                                       ("sets", list(SWEEP_SETS), False), ("judges", list(JUDGE_NAMES), False)):
        P[key] = as_list(P[key])
        if P[key] or not may_be_empty:
            problem = list_check(choices)(P[key])
            if problem and not (key == "sets" and not P[key] and P["user_sets"]):  # only user sets: fine
                raise ParameterError(f"Parameter {key}={P[key]!r} {problem}.")
    resolve_user_sets(P)
    if "refusal_keywords" not in P["judges"]:
        raise ParameterError("judges must include 'refusal_keywords' (the ASR every paper reports).")
    if P["preset"] not in models.PRESETS:
        raise ParameterError(f"Unknown model preset {P['preset']!r}; valid presets: {', '.join(models.PRESETS)}.")
    if P["layers"] != "all":
        P["layers"] = _parsed_list("layers", P["layers"], int, "'all' or a list of layer indices, e.g. `-p layers 0,15,-1`")
    P["cmrm_layers"] = _parsed_list("cmrm_layers", P["cmrm_layers"], int,
                                    "a list of layer indices, e.g. `-p cmrm_layers 15`")
    for key in ("layers", "cmrm_layers"):
        if P[key] != "all" and (not P[key] or any(isinstance(x, bool) or not isinstance(x, int) for x in P[key])):
            raise ParameterError(f"Parameter {key}={P[key]!r} must name decoder layers by integer index, e.g. [0, 15, -1].")
    numbers = "a list of numbers, e.g. `-p {} 0,0.5,1.0`"
    P["alphas"] = check_alphas(_parsed_list("alphas", P["alphas"], float, numbers.format("alphas")))
    P["sample_alphas"] = (check_alphas(_parsed_list("sample_alphas", P["sample_alphas"], float, numbers.format("sample_alphas")))
                          if P["sample_alphas"] else [])
    P["combined_alpha"] = check_alphas([P["combined_alpha"]])[0]
    return P


def check_inputs(P: dict) -> None:
    """Fail before loading a model: stage 01's sets and the adapters of the chosen methods must exist, and every row
    of a user set must show an image (CMRM corrects image inputs)."""
    check_eval_inputs(_as_stage03(P))
    method_folders(P)  # stage 03's picks must name checkpoints of this stage 02 run
    for path in P.get("user_sets") or []:
        text_only = [r for r in read_user_set(path) if not (r["image"] or r["image_text"])]
        if text_only:
            raise TuError(f"user set {path} line {text_only[0]['line']} has no image or image_text ({len(text_only)} "
                          "such rows): stage 05's sweep corrects image inputs (CMRM), so every row needs one. Give "
                          "each row an image, or evaluate text prompts in notebook 03.")
    claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK)  # every check passed: the output folder is ours now


def _as_stage03(P: dict) -> dict:
    """This stage's inputs in stage 03's terms: the anchor prompts (forget), the evaluated sets and the adapters."""
    return {"sets": ["forget", "v1_figstep", *P["sets"]], "user_sets": P.get("user_sets") or [], "split": P["split"],
            "data_dir": P["data_dir"], "unlearn_dir": P["unlearn_dir"],
            "methods": [BASE, *P["methods"], *P["combine_methods"]], "preset": P["preset"],
            "llava_images_dir": P["llava_images_dir"], "judges": P["judges"]}


def resolve_layers(vlm, P: dict) -> tuple[list[int], list[int]]:
    """(gap-analysis layers, CMRM layers) as 0-based indices of this model, checked right after loading."""
    n = len(vlm.decoder_layers())
    return check_layers(vlm, list(range(n)) if P["layers"] == "all" else P["layers"]), check_layers(vlm, P["cmrm_layers"])


def anchor_prompts(P: dict) -> list[str]:
    """The anchor set of the dataset-level shift, from the training side only (never the evaluated items):
    stage 01's forget questions and the organism's training benign titles, half each."""
    n_harm = P["anchor_size"] // 2
    harmful = [r["prompt"] for r in read_jsonl(stage01_file(P["data_dir"], "forget"))][:n_harm]
    benign = benign_titles(P["seed"])[0][: P["anchor_size"] - n_harm]
    return harmful + benign


def gap_instructions(P: dict) -> tuple[list[str], list[str]]:
    """(harmful, benign) instructions of the gap analysis, matched in form ("Steps to …", "List of …"):
    V1 FigStep's SafeBench phrases and the held-out benign titles of the reading set (at most n_gap each, as many
    harmful as benign; there are 42 held-out titles)."""
    harmful = [r["image_text"] for r in read_jsonl(stage01_file(P["data_dir"], "v1_figstep"))]
    benign = benign_titles(P["seed"])[1]
    n = min(P["n_gap"], len(harmful), len(benign))  # equal groups: the probe and the directions assume balance
    return harmful[:n], benign[:n]


def method_folders(P: dict) -> dict:
    """method -> the weights it is analysed at: stage 03's pick (evaluation.selection.picked_folders; None: the base
    model), else stage 02's final weights."""
    methods = dict.fromkeys([*P["methods"], *P["combine_methods"]])
    return picked_folders(resolve_path(P["eval_dir"]) if P.get("eval_dir") else None, resolve_path(P["unlearn_dir"]),
                          methods)


def model_context(vlm, P: dict, method: str):
    """The base model, or a stage 02 method's adapter at its picked checkpoint (method_folders) applied (removed on
    exit)."""
    folder = None if method == BASE else method_folders(P)[method]
    return contextlib.nullcontext(vlm) if folder is None else adapter_applied(vlm, folder)


def dataset_shift(vlm, P: dict, anchors: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """The dataset-level shift of the model as it is now (base, or with an adapter applied)."""
    images = [meaningless_image(vlm, P["meaningless"], P["seed"] + i) for i in range(len(anchors))]
    return shift_vectors(vlm, [vlm.chat(x, True) for x in anchors], [vlm.chat(x, False) for x in anchors], images, layers,
                         position=P["position"])


def model_shifts(vlm, P: dict, anchors: list[str], layers: list[int], models_: Sequence[str]) -> dict[str, dict]:
    """{model: dataset-level shift per CMRM layer}, each measured on that model (a method's adapter moves its
    hidden states, so its correction is its own)."""
    out = {}
    for model in dict.fromkeys(models_):
        with model_context(vlm, P, model):
            out[model] = dataset_shift(vlm, P, anchors, layers)
    return out


# ---------------------------------------------------------------------------------------------
# the gap: hidden states of every model under every condition


def collect_states(vlm, P: dict, layers: list[int], vectors: dict[str, dict], models_: Sequence[str]) -> tuple[dict, list[str]]:
    """{model: {condition: (2n, len(layers), d)}} for the base model, each method and the base model under
    dataset-level CMRM ("base+cmrm", image conditions corrected, text unchanged); and each row's group
    (harmful / benign). `vectors[model]` are the shift vectors at combined_alpha."""
    harmful, benign = gap_instructions(P)
    instructions, groups = harmful + benign, ["harmful"] * len(harmful) + ["benign"] * len(benign)
    read = partial(condition_states, vlm, instructions, layers, position=P["position"], batch_size=P["batch_size"],
                   seed=P["seed"])
    states = {}
    for model in models_:
        with model_context(vlm, P, model):
            states[model] = read()
            if model == BASE:
                with cmrm(vlm, vectors[BASE], P["combined_alpha"]):
                    states[f"{BASE}+cmrm"] = {"text": states[BASE]["text"],
                                              **read(conditions=[c for c in CONDITIONS if c != "text"])}
    return states, groups


def gap_rows(states: dict, groups: list[str], layers: list[int], seed: int = 0):
    """Per model, image condition and layer: gap_metrics against the model's text-only states, and the cosine
    between the harmful-vs-benign directions under that condition and in text."""
    import pandas as pd

    harm = np.array([g == "harmful" for g in groups])
    frames = []
    for model, by_cond in states.items():
        frames.append(gap_table(by_cond, layers, seed=seed, harmful=harm).assign(model=model))
    cols = ["model", "condition", "layer", "normalised_distance", "probe_accuracy", "direction_cosine",
            "centroid_distance", "within_spread"]
    return pd.concat(frames, ignore_index=True)[cols]


def pca_rows(states: dict, groups: list[str], layers: list[int], show_layers: Sequence[int], show_models: Sequence[str]):
    """2-D PCA coordinates per shown layer: fitted on the base model's states of every condition at that layer,
    so other models (and the CMRM-corrected base) are drawn in the base model's axes and their shift shows."""
    import pandas as pd
    from sklearn.decomposition import PCA

    rows = []
    for layer in show_layers:
        j = layers.index(layer)
        # exact SVD: with more features than 500, sklearn's "auto" picks the randomized solver, unseeded, and the
        # coordinates then differed between reruns (by ~1e-4)
        pca = PCA(n_components=2, svd_solver="full").fit(np.vstack([h[:, j] for h in states[BASE].values()]))
        var = pca.explained_variance_ratio_
        for model in show_models:
            for cond, h in states[model].items():
                xy = pca.transform(h[:, j])
                rows += [{"model": model, "layer": layer, "condition": cond, "group": g, "pc1": float(x), "pc2": float(y),
                          "pc1_variance": float(var[0]), "pc2_variance": float(var[1])} for g, (x, y) in zip(groups, xy)]
    return pd.DataFrame(rows)


def grid_layers(layers: list[int], k: int) -> list[int]:
    """k layers evenly spaced over `layers`, first and last included."""
    if k >= len(layers):
        return list(layers)
    return [layers[i] for i in sorted({round(x) for x in np.linspace(0, len(layers) - 1, k)})]


# ---------------------------------------------------------------------------------------------
# the alpha sweep: CMRM on the base model, each method alone and combined with CMRM


def sweep_plan(P: dict) -> list[dict]:
    """Runs of the sweep: {"run", "model", "variant" (none / dataset / sample), "alpha"}. Alpha 0 is the
    uncorrected model; the sample-level line starts from the base model's alpha-0 run."""
    runs = [{"model": BASE, "variant": "dataset" if a else "none", "alpha": a} for a in P["alphas"]]
    if 0.0 not in P["alphas"]:
        runs.insert(0, {"model": BASE, "variant": "none", "alpha": 0.0})
    runs += [{"model": BASE, "variant": "sample", "alpha": a} for a in P["sample_alphas"] if a]
    for m in P["combine_methods"]:
        runs += [{"model": m, "variant": "none", "alpha": 0.0}]
        if P["combined_alpha"]:
            runs += [{"model": m, "variant": "dataset", "alpha": P["combined_alpha"]}]
    return [dict(r, run=f"{r['model']}|{r['variant']}|{r['alpha']:g}") for r in runs]


def sweep_answers(vlm, P: dict, items: list[dict], plan: list[dict], vectors: dict[str, dict], layers: list[int]):
    """Answers of every run, keyed by run. `vectors[model]` is the model's own dataset-level shift
    (model_shifts); sample-level vectors are computed per item (two extra forward passes each)."""
    answers = {}
    texts, images = [it["text"] for it in items], [it["image"] for it in items]
    for model in dict.fromkeys(r["model"] for r in plan):
        with model_context(vlm, P, model):
            sample = None
            for r in (r for r in plan if r["model"] == model):
                if r["variant"] == "sample" and sample is None:
                    sample = sample_shift_vectors(vlm, items, P["meaningless"], layers, position=P["position"], seed=P["seed"])
                with cmrm(vlm, sample if r["variant"] == "sample" else vectors[model], r["alpha"]) as steering:
                    answers[r["run"]] = generate(vlm.model, vlm.processor, texts, images, max_new_tokens=P["max_new_tokens"],
                                                 batch_size=P["batch_size"], desc=r["run"], before_batch=steering.select)
    return answers


def sweep_rows(P: dict, plan: list[dict], judged: dict, provenance: dict):
    """Tidy rows as stage 03's results.csv (rate, n, 95% CI per set and metric), plus run, variant and alpha,
    and the refusal rate on benign reading images (over-refusal of image inputs)."""
    import pandas as pd


    rows = []
    for r in plan:
        df = judged[r["run"]]
        extra = {"run": r["run"], "variant": r["variant"], "alpha": r["alpha"]}
        rows += [dict(m, **extra) for m in metric_rows(P["preset"], r["model"], df, provenance, P["seed"])]
        benign = df[df["set"] == "utility_reading"]
        if len(benign):
            rows.append({"preset": P["preset"], "method": r["model"], "set": "utility_reading", "metric": "over_refusal",
                         "judge": "refusal_keywords", "judge_version": provenance["refusal_keywords"].get("judge_version"),
                         **stats.rate(benign["refused"].to_numpy(bool), seed=P["seed"]), **extra})
    return pd.DataFrame(rows)


def shift_norms(vectors: dict[str, dict], states: dict, layers: list[int]):
    """Size of each model's dataset-level shift per CMRM layer, beside the typical norm of its text-only states."""
    import pandas as pd

    rows = []
    for model, by_layer in vectors.items():
        for layer, v in by_layer.items():
            ref = states.get(model, {}).get("text")
            norm = float(np.linalg.norm(ref[:, layers.index(layer)], axis=1).mean()) if ref is not None and layer in layers else float("nan")
            rows.append({"model": model, "layer": layer, "shift_norm": float(v.norm()), "text_state_norm": norm})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# figures and outputs



def layers_figure(gap):
    """Gap per layer: normalised centroid distance, probe accuracy and direction cosine (rows) for each image
    condition against text (columns), one line per model."""
    import matplotlib.pyplot as plt
    import seaborn as sns


    theme()
    metrics = [("normalised_distance", "centroid distance / spread"), ("probe_accuracy", "probe accuracy (CV)"),
               ("direction_cosine", "cos(harm-benign dir., text)")]
    conds = [c for c in CONDITIONS if c in set(gap["condition"])]
    fig, axes = plt.subplots(len(metrics), len(conds), figsize=(4.6 * len(conds), 2.9 * len(metrics)), sharex=True,
                             sharey="row", squeeze=False)
    for i, (metric, label) in enumerate(metrics):
        for j, cond in enumerate(conds):
            ax = axes[i, j]
            sns.lineplot(data=gap[gap["condition"] == cond], x="layer", y=metric, hue="model", marker="o", markersize=4,
                         ax=ax, legend=(i == 0 and j == len(conds) - 1))
            ax.set(title=f"{cond} vs text" if i == 0 else "", ylabel=label if j == 0 else "", xlabel="decoder layer")
            if metric == "probe_accuracy":
                ax.set_ylim(0.45, 1.03)  # 0.5 = chance; a saturated probe should look flat, not zoomed into noise
    if axes[0, -1].get_legend() is not None:
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1.0), title="model")
    fig.suptitle("Representation gap per layer: image inputs vs the same instructions as text", y=1.0)
    fig.tight_layout()
    return fig


def pca_figure(pca, facet: str):
    """PCA scatter: one panel per `facet` value ('model' at one layer, or 'layer' for one model); colour is
    the input condition, marker the group (harmful / benign)."""
    import matplotlib.pyplot as plt
    import seaborn as sns


    theme()
    panels = list(dict.fromkeys(pca[facet]))
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.9 * rows), squeeze=False)
    for ax, value in zip(axes.flat, panels):
        d = pca[pca[facet] == value]
        sns.scatterplot(data=d, x="pc1", y="pc2", hue="condition", style="group", hue_order=list(CONDITIONS),
                        style_order=["harmful", "benign"], s=22, alpha=0.8, ax=ax, legend=ax is axes.flat[len(panels) - 1])
        title = f"layer {value}" if facet == "layer" else str(value)
        ax.set(title=title, xlabel=f"PC1 ({100 * d['pc1_variance'].iloc[0]:.0f}%)", ylabel=f"PC2 ({100 * d['pc2_variance'].iloc[0]:.0f}%)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    last = axes.flat[len(panels) - 1]
    if last.get_legend() is not None:
        sns.move_legend(last, "upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


ALPHA_PANELS = [("v1_figstep", "asr", "refusal_keywords", "V1 FigStep: ASR (keywords)"),
                ("v2_mmsb_typo", "asr", "refusal_keywords", "V2 MM-SB typo: ASR (keywords)"),
                ("v1_figstep", "on_topic_compliance", "on_topic", "V1: on-topic compliance"),
                ("v2_mmsb_typo", "on_topic_compliance", "on_topic", "V2: on-topic compliance"),
                ("utility_reading", "reading_on_topic", "on_topic", "benign reading (utility)"),
                ("utility_reading", "over_refusal", "refusal_keywords", "benign images refused"),
                (None, "degenerate", "fluency", "degenerate answers (all sets)")]


def alpha_panels(sets) -> list[tuple]:
    """ALPHA_PANELS, then two per user set in the sweep: its ASR under the keyword judge and its on-topic compliance."""
    panels = list(ALPHA_PANELS)
    for name in (n for n in dict.fromkeys(sets) if is_user_set(n)):
        label = eval_set(name).label
        panels += [(name, "asr", "refusal_keywords", f"{label}: ASR (keywords)"),
                   (name, "on_topic_compliance", "on_topic", f"{label}: on-topic compliance")]
    return panels


def alpha_table(sweep):
    """The figure's data: one row per panel, line and alpha. Lines: the base model under dataset-level and
    sample-level CMRM (both starting from its uncorrected run), and each method alone then with CMRM. User sets
    get panels of their own (alpha_panels)."""
    import pandas as pd

    rows = []
    for set_name, metric, judge, title in alpha_panels(sweep["set"]):
        sel = sweep[(sweep["metric"] == metric) & (sweep["judge"] == judge)]
        if set_name is not None:
            sel = sel[sel["set"] == set_name]
        if sel.empty:
            continue
        # n-weighted mean over sets when a panel pools sets (degenerate answers)
        agg = (sel.assign(k=sel["rate"] * sel["n"]).groupby(["method", "variant", "alpha"], as_index=False)
               .agg(k=("k", "sum"), n=("n", "sum"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean")))
        agg["rate"] = agg["k"] / agg["n"]
        if set_name is None:
            agg[["ci_low", "ci_high"]] = np.nan  # a pooled rate: no per-set interval applies
        for _, r in agg.iterrows():
            lines = ([f"{BASE} + CMRM (dataset)", f"{BASE} + CMRM (sample)"] if r["method"] == BASE and r["variant"] == "none"
                     else [f"{r['method']} + CMRM ({r['variant']})" if r["method"] == BASE else f"{r['method']} (+ CMRM)"])
            for line in lines:
                rows.append({"panel": title, "line": line, "alpha": r["alpha"], "rate": r["rate"], "n": int(r["n"]),
                             "ci_low": r["ci_low"], "ci_high": r["ci_high"]})
    table = pd.DataFrame(rows)
    has_sample = (sweep["variant"] == "sample").any()
    if not has_sample and len(table):
        table = table[table["line"] != f"{BASE} + CMRM (sample)"]
    return table.sort_values(["panel", "line", "alpha"], kind="stable").reset_index(drop=True)


def alpha_figure(table):
    """Rate against alpha, one panel per metric, one line per model and correction, 95% CIs as bars."""
    import matplotlib.pyplot as plt


    theme()
    builtin = [t for *_, t in ALPHA_PANELS]
    panels = [t for t in builtin if t in set(table["panel"])] + [t for t in dict.fromkeys(table["panel"]) if t not in builtin]
    lines = list(dict.fromkeys(table["line"]))
    colours = dict(zip(lines, plt.get_cmap("tab10").colors))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.3 * rows), sharex=True, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for line in lines:
            d = table[(table["panel"] == panel) & (table["line"] == line)].sort_values("alpha")
            if d.empty:
                continue
            err = np.vstack([d["rate"] - d["ci_low"], d["ci_high"] - d["rate"]]).clip(min=0)
            ax.errorbar(d["alpha"], d["rate"], yerr=None if np.isnan(err).all() else err, marker="o", ms=4, capsize=2,
                        lw=1.3, color=colours[line], ls="--" if "(sample)" in line else "-", label=line)
        ax.set(title=panel, ylim=(-0.03, 1.03), xlabel="CMRM alpha", ylabel="rate")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.04 * rows))
    fig.suptitle("CMRM alpha sweep: attacks, utility and over-refusal on image inputs (95% CIs)", y=1.0)
    fig.tight_layout()
    return fig


def write_outputs(P: dict, out, tables: dict, judged: dict, plan: list[dict], items: list[dict], started: float) -> None:
    """Every table as CSV, the judged answers of every run (JSONL: full text stays in the result files), and
    the run record."""
    import pandas as pd


    claim_output_dir(out, NOTEBOOK)
    for name, table in tables.items():
        write_csv(table, out / f"{name}.csv")
    frames = [judged[r["run"]].assign(run=r["run"], model=r["model"], variant=r["variant"], alpha=r["alpha"],
                                      instruction=[it["instruction"] for it in items]) for r in plan]
    with atomic_path(out / "judgements.jsonl") as tmp:
        pd.concat(frames, ignore_index=True).to_json(tmp, orient="records", lines=True, force_ascii=False)
    write_json(out / "run_record.json", run_record(P, input_hashes(_as_stage03(P)), started,
                                                   seeds={"noise_images_and_probes": P["seed"]}))
