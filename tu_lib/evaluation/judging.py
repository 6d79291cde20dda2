"""Generation of every model's answers (resumable, keyed by the weights) and the chosen judges over them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import judges
from ..core.params import resolve_path
from ..models.adapters import adapter_applied
from ..models.generate import generate_jsonl, weights_fingerprint
from ..models.presets import organism

JUDGE_NAMES = ("refusal_keywords", "harmfulness", "on_topic", "fluency", "llama_guard")


# ---------------------------------------------------------------------------------------------
# generation and judging


def generate_method(vlm, P: dict, method: str, items: list[dict], out: Path) -> list[str]:
    """Answers of one model to every item, resumable, in out/generations/<preset>/<method>-<weights>.jsonl: the
    file is named by the weights' fingerprint, so a retrained adapter or rebuilt organism never reuses old answers."""
    import contextlib


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
        lm, tok = organism.load_backbone()
        return lm.eval(), tok, lambda p: organism.chat(tok, p)
    return vlm.base_model, vlm.tokenizer, lambda p: vlm.chat(p, False)


class Judges:
    """The chosen judges, built once (the harmfulness classifier is fitted on the vendored labels)."""

    def __init__(self, vlm, names: list[str], on_topic_card: dict | None = None):
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
            if any(it.get("category") for it in items):  # a user set's own labels, kept with each judgement
                df.insert(2, "category", [it.get("category") for it in items])
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
