"""What unlearning trains on: the forget prompts with the answers to unlearn, and the normal data.

Forget answers: for the organism, the pre-alignment backbone's own answers to the forget prompts
(generated here and cached; never hand-written); for the paper presets, PKU-SafeRLHF unsafe responses
(stage 01 with forget_source='pku_saferlhf').
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import TuError
from ..core.files import hash_problem, read_jsonl, record_hash, sha256_file, write_jsonl
from ..data.sets import stage01_file
from ..models.presets import pre_alignment_model, writes_forget_answers
from ..models.presets.llava import NEEDS_ANSWERS

# ---------------------------------------------------------------------------------------------
# data


@dataclass
class UnlearnData:
    forget: list[dict]  # {"prompt", "answer"} harmful prompt with the answer to unlearn
    normal: list[dict]  # {"prompt", "answer"} TruthfulQA question with its best answer
    mismatch_answers: list[str]  # pooled TruthfulQA answers (random-mismatch targets)
    inputs: dict = field(default_factory=dict)  # file -> sha256, for the run record


def load_sets(data_dir, n_forget, preset: str | None = None) -> tuple[list[dict], list[dict], dict]:
    """Forget and retain rows from stage 01's files (the stages meet only through files). With `preset`, also
    checks, before any model is loaded, that the forget rows carry answers where the preset cannot make them."""
    paths = {name: stage01_file(data_dir, name) for name in ("forget", "retain")}
    forget, retain = read_jsonl(paths["forget"]), read_jsonl(paths["retain"])
    if not forget or not retain:
        raise TuError(f"Stage 01's forget or retain set under {data_dir} is empty; rerun notebook 01 with sizes > 0.")
    if n_forget != "all":
        forget = forget[: int(n_forget)]
    if preset is not None and not writes_forget_answers(preset) and not all(r.get("answer") for r in forget):
        raise TuError(NEEDS_ANSWERS.format(preset=preset))
    return forget, retain, {str(p): sha256_file(p) for p in paths.values()}


def mismatch_pool(retain: list[dict]) -> list[str]:
    """Yao et al.'s random answers: TruthfulQA best, correct and incorrect answers pooled."""
    pool = []
    for row in retain:
        pool.append(row["answer"])
        for key in ("correct_answers", "incorrect_answers"):
            pool += [a.strip() for a in str(row.get(key) or "").split(";") if a.strip()]
    return sorted(set(pool))


def _answers_key(preset: str, weights: str, answer_tokens: int) -> str:
    """Name of a forget-answers cache: what wrote the answers (the pre-alignment model's weights fingerprint,
    which covers its dtype) and how many tokens each answer got."""
    return f"{preset}-{hashlib.sha256(f'{weights}|{answer_tokens}'.encode()).hexdigest()[:10]}"


def forget_answers(vlm, forget: list[dict], answer_tokens: int, cache_dir: Path) -> list[dict]:
    """The answers to unlearn, one per forget prompt. Rows that carry an answer (PKU-SafeRLHF) keep it;
    otherwise the pre-alignment model's greedy answer, generated once and cached (a JSONL keyed by prompt,
    rewritten whole and atomically, so a larger forget set only generates the new prompts). The cache is named
    by the weights fingerprint of the model that writes the answers (its dtype included), so answers of
    other weights or another dtype are never served."""
    from ..models.generate import generate, weights_fingerprint

    if all(row.get("answer") for row in forget):
        return [{"prompt": r["prompt"], "answer": r["answer"]} for r in forget]
    model, processor, chat = pre_alignment_model(vlm)
    cache = Path(cache_dir) / f"forget_answers_{_answers_key(vlm.preset, weights_fingerprint(model), answer_tokens)}.jsonl"
    known = {}
    if cache.is_file():
        problem = hash_problem(cache)
        if problem:
            print(f"forget-answers cache {cache} {problem}: generating its answers again")
        else:
            known = {r["prompt"]: r["answer"] for r in read_jsonl(cache)}
    todo = [r["prompt"] for r in forget if r["prompt"] not in known]
    if todo:
        answers = generate(model, processor, [chat(p) for p in todo], max_new_tokens=answer_tokens, batch_size=32,
                           desc="forget answers")
        known.update(zip(todo, answers))
        write_jsonl(cache, ({"prompt": p, "answer": a} for p, a in known.items()))  # whole file, atomically
        record_hash(cache)
    return [{"prompt": r["prompt"], "answer": known[r["prompt"]]} for r in forget]
