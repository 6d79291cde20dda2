"""Refusal tuning: supervised fine-tuning of one fixed refusal on the forget prompts, in text or shown as images
(VLGuard-style), the baseline paper A compares unlearning with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import REFUSAL, Method, Step


@dataclass(frozen=True)
class RefusalSFT(Method):
    """NLL of the refusal on the forget prompts."""

    def target(self, row: dict) -> str:
        return REFUSAL

    def forget_terms(self, step: Step) -> list[torch.Tensor]:
        return [step.forget_nll]


TEXT_SFT = RefusalSFT("text_sft", "refusal SFT on the forget prompts in text")
MM_SFT = RefusalSFT("mm_sft", "refusal SFT on the forget prompts shown as images (VLGuard-style)", images=True)
