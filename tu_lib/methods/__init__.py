"""Unlearning methods behind one registry, their data (forget answers, normal data) and the resumable run
that trains one of them.
"""
from __future__ import annotations

from .base import (
    METHODS,
    MMSB_QUESTION_PROMPT,
    PAPER_METHODS,
    REFUSAL,
    STEP_ROLES,
    ImageCache,
    Method,
    forget_form,
    step_loss,
    step_order,
    step_rows,
)
from .config import TrainConfig
from .data import ANSWERING_PRESETS, UnlearnData, forget_answers, load_sets, mismatch_pool, pre_alignment_model
from .params import NOTEBOOK, SPEC, resolve_params
from .run import (
    RESULT_FILES,
    finished_summary,
    load_checkpoint,
    method_problem,
    save_checkpoint,
    schedule,
    shard,
    train,
    wrap_model,
)
