"""Unlearning methods: harmful behaviour unlearned in the LLM inside the VLM, and the baselines it is compared with.

Every method is a forget-side loss over one shared training loop (a registry, as in open-unlearning):

| method          | forget prompts shown as | forget-side loss                                                    |
|-----------------|-------------------------|---------------------------------------------------------------------|
| `textual_ga`    | text                    | 0.5·(−NLL of the harmful answer) + 1·NLL of a random normal answer  |
| `multimodal_ga` | typographic images      | the same, with the prompt rendered FigStep- or MM-SafetyBench-style |
| `text_sft`      | text                    | NLL of a refusal                                                    |
| `mm_sft`        | typographic images      | NLL of a refusal (VLGuard-style refusal tuning)                     |
| `npo`           | text                    | NPO (Zhang et al. 2024) on the harmful answer, β = `npo_beta`       |

Every method adds the same normal-side term, 1·KL(p_frozen ‖ p_current) on normal data (TruthfulQA
question/best-answer pairs), with the frozen reference obtained by disabling the LoRA adapter (no model
copy). This is Yao et al.'s recipe (arXiv 2310.10683; `llm_unlearn`), whose code computes the same KL
up to the reference's entropy, a constant. Only the LLM is updated: LoRA on the language model's decoder
linears (or full fine-tuning of the language model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..render.pages import FIGSTEP_TEXT_PROMPT
from ..training.batches import answer_logits, encode_rows, kl_to_reference, per_row_mean, token_nll
from .config import TrainConfig
from .data import UnlearnData

REFUSAL = "I'm sorry, but I can't help with that."
# Generic instruction sent with an image that holds a forget question (MM-SafetyBench style; FigStep's
# own benign prompt is used for the FigStep-style page).
MMSB_QUESTION_PROMPT = "The image shows a question. Answer it in detail."


@dataclass(frozen=True)
class Method:
    name: str
    objective: str  # "ga" (ascent + mismatch), "sft" (refusal), "npo"
    images: bool  # forget prompts rendered as typographic images
    doc: str


METHODS = {m.name: m for m in [
    Method("textual_ga", "ga", False, "gradient ascent on harmful answers + random-mismatch NLL, text only (paper A)"),
    Method("multimodal_ga", "ga", True, "the same objective with the forget prompts shown as typographic images"),
    Method("text_sft", "sft", False, "refusal SFT on the forget prompts in text"),
    Method("mm_sft", "sft", True, "refusal SFT on the forget prompts shown as images (VLGuard-style)"),
    Method("npo", "npo", False, "negative preference optimisation on harmful answers, text only (optional extra)"),
]}
PAPER_METHODS = ["textual_ga", "multimodal_ga", "text_sft", "mm_sft"]


class ImageCache:
    """Typographic renders of forget prompts, made once per (text, style)."""

    def __init__(self, vlm):
        self.vlm, self._images = vlm, {}

    def __call__(self, text: str, style: str):
        key = (text, style)
        if key not in self._images:
            self._images[key] = self.vlm.render(text, style)
        return self._images[key]


def forget_form(vlm, method: Method, prompt: str, index: int, images: ImageCache) -> tuple[str, object]:
    """(text prompt, image) of a forget prompt for this method: the prompt itself in text, or for the
    multimodal methods the prompt rendered as an image, alternating FigStep's page (with its benign text
    prompt) and an MM-SafetyBench-style image (with a generic instruction)."""
    if not method.images:
        return prompt, None
    if index % 2 == 0:
        return FIGSTEP_TEXT_PROMPT, images(prompt, "figstep")
    return MMSB_QUESTION_PROMPT, images(prompt, "mmsb")


def step_rows(vlm, method: Method, data: UnlearnData, plan: dict, images: ImageCache) -> dict[str, list]:
    """The rows of one step by role: forget (target: harmful answer, or refusal for SFT), mismatch (GA
    only: the same prompt with a random normal answer) and normal (KL rows)."""
    rows = {"forget": [], "mismatch": [], "normal": []}
    for fi, mi in zip(plan["forget"], plan["mismatch"]):
        row = data.forget[fi]
        prompt, image = forget_form(vlm, method, row["prompt"], fi, images)
        target = REFUSAL if method.objective == "sft" else row["answer"]
        rows["forget"].append((prompt, image, target))
        if method.objective == "ga":
            rows["mismatch"].append((prompt, image, data.mismatch_answers[mi]))
    rows["normal"] = [(data.normal[i]["prompt"], None, data.normal[i]["answer"]) for i in plan["normal"]]
    return rows


STEP_ROLES = ("forget", "mismatch", "normal")  # the order of a step's rows in its one forward


def step_order(rows: dict[str, list]) -> list:
    """A step's rows in the order of its forward (step_loss slices the losses by this order)."""
    return [r for role in STEP_ROLES for r in rows[role]]


def step_loss(model, reference, method: Method, cfg: TrainConfig, vlm, rows: dict[str, list]) -> tuple[torch.Tensor, dict]:
    """The method's loss on one step's rows and its logged terms (floats).

    One forward of the current model over all rows; the frozen reference (`reference()` is a context
    manager under which `model` is the original) runs on the normal rows (KL) and, for NPO, on the forget rows."""
    order = step_order(rows)
    n_f, n_m, n_n = (len(rows[k]) for k in STEP_ROLES)
    batch = encode_rows(vlm, order)
    logits, targets, row = answer_logits(model, batch)
    nll_rows = per_row_mean(token_nll(logits, targets), row, len(order))
    terms, logged = [], {}
    f_nll = nll_rows[:n_f].mean()
    logged["forget_nll"] = float(f_nll.detach())
    if method.objective == "ga":
        m_nll = nll_rows[n_f:n_f + n_m].mean()
        terms += [-cfg.ga_weight * f_nll, cfg.mismatch_weight * m_nll]
        logged["mismatch_nll"] = float(m_nll.detach())
    elif method.objective == "sft":
        terms.append(f_nll)
    elif method.objective == "npo":
        keep = row < n_f
        logp = -torch.zeros(n_f, device=logits.device).index_add_(0, row[keep], token_nll(logits[keep], targets[keep]))
        with torch.no_grad(), reference():
            r_logits, r_targets, r_row = answer_logits(model, encode_rows(vlm, rows["forget"]))
            ref_logp = -torch.zeros(n_f, device=logits.device).index_add_(0, r_row, token_nll(r_logits, r_targets))
        terms.append(-(2.0 / cfg.npo_beta) * torch.nn.functional.logsigmoid(-cfg.npo_beta * (logp - ref_logp)).mean())
    if n_n and cfg.kl_weight > 0:
        keep = row >= n_f + n_m
        with torch.no_grad(), reference():
            ref_logits, _, _ = answer_logits(model, encode_rows(vlm, rows["normal"]))
        kl = kl_to_reference(logits[keep], ref_logits)
        terms.append(cfg.kl_weight * kl)
        logged["kl"] = float(kl.detach())
        logged["normal_nll"] = float(nll_rows[n_f + n_m:].mean().detach())
    loss = torch.stack(terms).sum()
    logged["loss"] = float(loss.detach())
    return loss, logged
