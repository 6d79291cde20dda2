"""Generation of every model's answers (resumable, keyed by the weights) and the chosen judges over them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.errors import TuError
from ..core.params import resolve_path
from ..judges.base import JudgeContext
from ..judges.registry import JUDGES, REQUIRED_JUDGE
from ..models.adapters import adapter_applied
from ..models.generate import generate_jsonl, weights_fingerprint

JUDGE_NAMES = tuple(JUDGES)  # what the stages' `judges` parameter may name


# ---------------------------------------------------------------------------------------------
# generation and judging


def method_weights(vlm, P: dict, method: str, folder: Path | None = None):
    """The block in which `vlm.model` is `method`'s model: the bare base model for "base", else the LoRA adapter of
    `folder` (default: stage 02's final weights, unlearn_dir/<method>; a training-curve point's folder from
    methods.curve_checkpoints scores that step instead). One loaded model serves every method and checkpoint."""
    import contextlib

    if method == "base" and folder is None:
        return contextlib.nullcontext(vlm)
    return adapter_applied(vlm, folder if folder is not None else resolve_path(P["unlearn_dir"]) / method)


def _shared_layer_count(P: dict) -> int:
    """How many decoder layers (from the bottom) all of P's models share: those below the lowest `lora_first_layer`
    of stage 02's runs of P's methods (15 on the organism's profiles). 0 when a run adapts every layer (the paper
    profile) or fine-tunes the whole LLM, or a run's summary cannot be read (check_eval_inputs has then already said
    what is missing)."""
    import json

    firsts = []
    for m in P["methods"]:
        if m == "base":
            continue
        try:
            config = json.loads((resolve_path(P["unlearn_dir"]) / m / "summary.json").read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError):
            return 0
        firsts.append(config.get("lora_first_layer", 0) if config.get("lora", True) else 0)
    return min(firsts, default=0)


def shared_lower_layers(P: dict):
    """A store for the generation prefill states of the layers all of P's models share (models.lower_layers), or
    None when they share none: every model then prefills in full."""
    from ..models.lower_layers import SharedLowerLayers

    k = _shared_layer_count(P)
    return SharedLowerLayers(k) if k > 0 else None


def forward_tape(P: dict):
    """A tape of the shared layers' states for continuation scoring (TruthfulQA MC1) of several of P's models on the
    same questions (models.lower_layers.ForwardTape), or None when they share no layer."""
    from ..models.lower_layers import ForwardTape

    k = _shared_layer_count(P)
    return ForwardTape(k) if k > 0 else None


def generate_models(vlm, P: dict, models: dict[str, tuple[str, Path | None]], items: list[dict], out: Path,
                    desc: str = "{label}") -> dict[str, list[str]]:
    """generate_method for each of `models` (label -> (method, checkpoint folder or None)) on the same items: the
    layers below every model's adapters are prefilled once per item (by the first model) and replayed for the others
    (shared_lower_layers; about a quarter of a validation pass per checkpoint on the organism), with the same answers
    as prefilling each model in full. `desc`: the progress bar's label, formatted with `label`."""
    lower = shared_lower_layers(P)
    return {label: generate_method(vlm, P, m, items, out, folder=folder, desc=desc.format(label=label), lower=lower)
            for label, (m, folder) in models.items()}


def generate_method(vlm, P: dict, method: str, items: list[dict], out: Path, folder: Path | None = None,
                    desc: str | None = None, lower=None) -> list[str]:
    """Answers of one model (method_weights: `method`'s final weights, or those of `folder`) to every item,
    resumable, in out/generations/<preset>/<method>-<weights>.jsonl: the file is named by the weights' fingerprint,
    so a retrained adapter, another curve point or a rebuilt organism never reuses old answers."""
    rows = [{"key": it["key"], "text": it["text"], "image": it["image"]} for it in items]
    with method_weights(vlm, P, method, folder):
        weights = weights_fingerprint(vlm.model)
        path = out / "generations" / vlm.preset / f"{method}-{weights}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return generate_jsonl(vlm.model, vlm.processor, rows, path, max_new_tokens=P["max_new_tokens"],
                              batch_size=P["batch_size"], desc=desc or method, model_id=weights, lower=lower)


class Judges:
    """The chosen judges of the registry (judges.registry), built once for one evaluation (the harmfulness
    classifier is fitted on the vendored labels; the fluency judge loads its frozen reference LM)."""

    def __init__(self, vlm, names: list[str], on_topic_card: dict | None = None):
        unknown = [n for n in names if n not in JUDGES]
        if unknown:
            raise TuError(f"Unknown judge(s) {unknown}; known judges: {', '.join(JUDGES)}.")
        self.names = names
        ctx = JudgeContext(vlm=vlm, on_topic_card=on_topic_card)
        self.judges = {name: entry.make(ctx) for name, entry in JUDGES.items() if name in names or name == REQUIRED_JUDGE}

    def harmfulness_cv(self) -> dict:
        """Cross-validated quality of the harmfulness judge (folds grouped by objective)."""
        harm = self.judges.get("harmfulness")
        return dict(harm.cross_validation or {}) if harm is not None else {}

    def provenance(self) -> dict:
        return {name: judge.provenance() for name, judge in self.judges.items()}

    def judge(self, items: list[dict], answers: list[str]) -> pd.DataFrame:
        """One row per item: key, set, one boolean column per judge (its registry entry's `column`), answer."""
        return self.judge_all(items, {"model": answers})["model"]

    def judge_all(self, items: list[dict], answers: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
        """`judge` for every model's answers to the same items; a judge with `judge_many` (fluency) scores each
        prompt once for all models."""
        models = list(answers)
        columns: dict[str, dict[str, object]] = {m: {} for m in models}
        for name, judge in self.judges.items():
            entry = JUDGES[name]
            first = [it["prompt"] if entry.reads == "prompt" else it["instruction"] for it in items]
            if hasattr(judge, "judge_many"):
                found = judge.judge_many(first, [answers[m] for m in models])
            else:
                found = [judge.judge(first, answers[m]) for m in models]
            for m, values in zip(models, found):
                columns[m][entry.column] = values
        labels = {"category": [it.get("category") for it in items]} if any(it.get("category") for it in items) else {}
        # a user set's own labels (category) are kept with each judgement
        return {m: pd.DataFrame({"key": [it["key"] for it in items], "set": [it["set"] for it in items], **labels,
                                 **columns[m]}).assign(answer=answers[m]) for m in models}
