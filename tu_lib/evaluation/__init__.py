"""Evaluation pieces shared by stages 03 and 05: the stages' inputs, the items of every set, generation
and judging, metric rows and tables, two models compared on the same items (A/B), V3's adversarial images, the
training curves (every checkpoint scored on validation; the cost at matched safety) and the pre-registered rule that
picks a checkpoint from each method's validation curve.
"""
from __future__ import annotations

from .ab import ab_table, format_ab, vs_base
from .adversarial import cached_images, optimise_images, projected_features, vision_fingerprint
from .curves import (CURVE_COLUMNS, curve_problem, first_reach, matched_cost_ratio, safety_levels, score_curve,
                     step_gflop)
from .inputs import input_files, input_hashes
from .items import build_items, reading_rows
from .judging import JUDGE_NAMES, Judges, generate_method, generate_models
from .metrics import judge_agreement, mc1_for, metric_rows, paper_table, truthfulqa_mc1
from .selection import RULE_CONDITIONS, picked_checkpoints, rule_problem, select_checkpoint
