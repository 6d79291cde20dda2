"""Unlearning methods by name (the order of notebook 02's parameter help and of stage 04's tables)."""
from __future__ import annotations

from . import ga, grad_diff, npo, sft
from .base import Method

METHODS: dict[str, Method] = {m.name: m for m in [
    ga.TEXTUAL_GA,
    ga.MULTIMODAL_GA,
    sft.TEXT_SFT,
    sft.MM_SFT,
    npo.NPO_TEXT,
    grad_diff.GRAD_DIFF,
]}
PAPER_METHODS = ["textual_ga", "multimodal_ga", "text_sft", "mm_sft"]  # the four paper A compares
