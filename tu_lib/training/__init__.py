"""Training pieces shared by the organism build, unlearning and the cost stage: answer-only batches and
losses, and the organism's build recipe.
"""
from __future__ import annotations

from .batches import answer_logits, encode_batch, encode_rows, kl_to_reference, per_row_mean, sft_loss, token_nll
