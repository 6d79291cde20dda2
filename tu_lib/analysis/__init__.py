"""Representation analysis (paper B): hidden states, the text/image gap, CMRM; and the analytic FLOP model.
"""
from __future__ import annotations

from .cmrm import Steering
from .flops import GPUS, Batch, Shape, backward_flops, forward_flops, llava_shape, step_flops, vision_flops
from .repgap import (
    CONDITIONS,
    POSITIONS,
    check_alphas,
    check_layers,
    condition_states,
    direction_cosine,
    gap_metrics,
    gap_table,
    hidden_states,
    matched_inputs,
    mean_shift,
    meaningless_image,
    sample_shift_vectors,
    shift_vectors,
)
