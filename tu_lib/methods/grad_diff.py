"""Gradient difference (Liu et al. 2022; open-unlearning's GradDiff): ascent on the harmful answers and, at the same
step, descent on the normal answers, so what is unlearned is what distinguishes the forget data from the normal data.
The proof that a method is one file: it needs nothing but this class, its registry line and its test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Step


@dataclass(frozen=True)
class GradientDifference(Method):
    """ga_weight·(−NLL of the harmful answer) + NLL of the normal rows' answers (the rows the shared KL term also
    uses), text only; the stop rule on the forget NLL applies."""

    ascends: ClassVar[bool] = True

    def forget_terms(self, step: Step) -> list[torch.Tensor]:
        retain_nll = step.normal_nll
        step.logged["retain_nll"] = float(retain_nll.detach())
        return [-step.cfg.ga_weight * step.forget_nll, retain_nll]


GRAD_DIFF = GradientDifference("grad_diff", "gradient difference: ascent on harmful answers, descent on normal answers, "
                               "text only (extra baseline)")
