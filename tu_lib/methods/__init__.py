"""Unlearning methods behind one registry, their data (forget answers, normal data) and the resumable run
that trains one of them, with the checkpoints it keeps for training curves.
"""
from __future__ import annotations

from .base import (
    MMSB_QUESTION_PROMPT,
    REFUSAL,
    STEP_ROLES,
    ImageCache,
    Method,
    Step,
    forget_form,
    step_loss,
    step_order,
    step_rows,
)
from .config import TrainConfig
from .data import UnlearnData, forget_answers, load_sets, mismatch_pool
from .params import NOTEBOOK, SPEC, resolve_params
from .registry import METHODS, PAPER_METHODS
from .run import (
    CURVE_DIR,
    RESULT_FILES,
    curve_checkpoints,
    curve_point_dir,
    curve_steps,
    finished_summary,
    load_checkpoint,
    method_problem,
    save_checkpoint,
    schedule,
    shard,
    train,
    wrap_model,
)
