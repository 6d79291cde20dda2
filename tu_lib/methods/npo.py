"""Negative preference optimisation (Zhang et al. 2024) on the harmful answers: an ascent whose step shrinks as the
model's likelihood of an answer falls below the frozen reference's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..training.batches import answer_logits, encode_rows, token_nll
from .base import Method, Step


@dataclass(frozen=True)
class NPO(Method):
    """−(2/β)·mean log σ(−β·(log p(answer) − log p_ref(answer))), summed log-probabilities per forget row."""

    ascends: ClassVar[bool] = True

    def forget_terms(self, step: Step) -> list[torch.Tensor]:
        n_f, logits, targets, row = step.n_forget, step.logits, step.targets, step.row
        keep = row < n_f
        logp = -torch.zeros(n_f, device=logits.device).index_add_(0, row[keep], token_nll(logits[keep], targets[keep]))
        with torch.no_grad(), step.reference():
            r_logits, r_targets, r_row = answer_logits(step.model, encode_rows(step.vlm, step.rows["forget"]))
            ref_logp = -torch.zeros(n_f, device=logits.device).index_add_(0, r_row, token_nll(r_logits, r_targets))
        beta = step.cfg.npo_beta
        return [-(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (logp - ref_logp)).mean()]


NPO_TEXT = NPO("npo", "negative preference optimisation on harmful answers, text only (optional extra)")
