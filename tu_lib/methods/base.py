"""Unlearning methods: harmful behaviour unlearned in the LLM inside the VLM, and the baselines it is compared with.

Every method is a small class (its forget rows and forget-side loss terms) over one shared step and loop;
the registry (methods.registry) lists them, as in open-unlearning:

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

Adding a method: one file with its class (subclass Method: `forget_terms`, and `target` / `mismatch` / `ascends`
where they differ) and its instances, one line in methods/registry.py, and its test. Whether the forget prompts
are shown as images is the `images` flag of an instance, apart from the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    """One unlearning method. `images`: the forget prompts are shown as typographic images (the modality flag).
    Subclasses set `ascends` (the stop rule on the forget NLL applies), `mismatch` (each forget row also gets a
    random normal answer as a mismatch row) and implement `forget_terms`."""

    name: str
    doc: str
    images: bool = False
    ascends: ClassVar[bool] = False
    mismatch: ClassVar[bool] = False

    def target(self, row: dict) -> str:
        """The forget row's training target: the answer to unlearn (a refusal for refusal tuning)."""
        return row["answer"]

    def forget_terms(self, step: "Step") -> list[torch.Tensor]:
        """The forget-side loss terms of one step (summed with the shared KL term); may log more floats in step.logged."""
        raise NotImplementedError


@dataclass
class Step:
    """One step's forward, as a method's `forget_terms` sees it: per-row mean NLLs over the current model's single
    forward (rows in STEP_ROLES order), the answer-position logits, the counts per role, the frozen reference
    (`reference()` is a context manager under which `model` is the original) and the run's settings."""

    model: object
    reference: object
    vlm: object
    cfg: TrainConfig
    rows: dict[str, list]
    logits: torch.Tensor
    targets: torch.Tensor
    row: torch.Tensor
    nll_rows: torch.Tensor
    n_forget: int
    n_mismatch: int
    logged: dict

    @property
    def forget_nll(self) -> torch.Tensor:
        return self.nll_rows[:self.n_forget].mean()

    @property
    def mismatch_nll(self) -> torch.Tensor:
        return self.nll_rows[self.n_forget:self.n_forget + self.n_mismatch].mean()

    @property
    def normal_nll(self) -> torch.Tensor:
        return self.nll_rows[self.n_forget + self.n_mismatch:].mean()


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
        rows["forget"].append((prompt, image, method.target(row)))
        if method.mismatch:
            rows["mismatch"].append((prompt, image, data.mismatch_answers[mi]))
    rows["normal"] = [(data.normal[i]["prompt"], None, data.normal[i]["answer"]) for i in plan["normal"]]
    return rows


STEP_ROLES = ("forget", "mismatch", "normal")  # the order of a step's rows in its one forward


def step_order(rows: dict[str, list]) -> list:
    """A step's rows in the order of its forward (step_loss slices the losses by this order)."""
    return [r for role in STEP_ROLES for r in rows[role]]


def step_loss(model, reference, method: Method, cfg: TrainConfig, vlm, rows: dict[str, list]) -> tuple[torch.Tensor, dict]:
    """The method's loss on one step's rows and its logged terms (floats): the method's forget-side terms, then the
    normal-side KL(frozen || current) every method shares.

    One forward of the current model over all rows; the frozen reference (`reference()` is a context
    manager under which `model` is the original) runs on the normal rows (KL) and, where a method asks, on others."""
    order = step_order(rows)
    n_f, n_m, n_n = (len(rows[k]) for k in STEP_ROLES)
    batch = encode_rows(vlm, order)
    logits, targets, row = answer_logits(model, batch)
    nll_rows = per_row_mean(token_nll(logits, targets), row, len(order))
    step = Step(model, reference, vlm, cfg, rows, logits, targets, row, nll_rows, n_f, n_m, logged={})
    step.logged["forget_nll"] = float(step.forget_nll.detach())
    terms = method.forget_terms(step)
    logged = step.logged
    if n_n and cfg.kl_weight > 0:
        keep = row >= n_f + n_m
        with torch.no_grad(), reference():
            ref_logits, _, _ = answer_logits(model, encode_rows(vlm, rows["normal"]))
        kl = kl_to_reference(logits[keep], ref_logits)
        terms.append(cfg.kl_weight * kl)
        logged["kl"] = float(kl.detach())
        logged["normal_nll"] = float(step.normal_nll.detach())
    loss = torch.stack(terms).sum()
    logged["loss"] = float(loss.detach())
    return loss, logged
