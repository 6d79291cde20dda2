"""Gradient ascent on the harmful answers with a random-mismatch term (Yao et al., arXiv 2310.10683): paper A's
textual unlearning, and the same objective with the forget prompts shown as images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Step


@dataclass(frozen=True)
class GradientAscent(Method):
    """ga_weight·(−NLL of the harmful answer) + mismatch_weight·NLL of a random normal answer to the same prompt."""

    ascends: ClassVar[bool] = True
    mismatch: ClassVar[bool] = True

    def forget_terms(self, step: Step) -> list[torch.Tensor]:
        m_nll = step.mismatch_nll
        step.logged["mismatch_nll"] = float(m_nll.detach())
        return [-step.cfg.ga_weight * step.forget_nll, step.cfg.mismatch_weight * m_nll]


TEXTUAL_GA = GradientAscent("textual_ga", "gradient ascent on harmful answers + random-mismatch NLL, text only (paper A)")
MULTIMODAL_GA = GradientAscent("multimodal_ga", "the same objective with the forget prompts shown as typographic images",
                               images=True)
