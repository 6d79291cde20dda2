"""CMRM (paper B): hidden states shifted back by alpha times a shift vector, with hooks on the decoder layers."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..core.errors import TuError
from .repgap import check_alphas, check_layers


class Steering:
    """The live CMRM correction: `select(rows)` names the items of the batch about to be decoded, so
    sample-level vectors (one row per item) line up with the batch; dataset-level vectors ignore it."""

    def __init__(self):
        self.rows: list[int] | None = None

    def select(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)


@contextlib.contextmanager
def cmrm(vlm, vectors: dict[int, torch.Tensor], alpha: float):
    """Within the block, every position's output of each chosen decoder layer is h - alpha * v (generation
    and recorded hidden states alike); the hooks are removed on exit, which restores the model exactly.
    v is (hidden,) for the dataset-level correction, or (n_items, hidden) for the sample-level one; then
    call `select(rows)` on the yielded Steering before each batch (`generate(..., before_batch=...)`)."""
    check_alphas([alpha])
    blocks = vlm.decoder_layers()
    check_layers(vlm, list(vectors))
    steering, handles = Steering(), []

    def shift(vec, like):
        if vec.ndim == 2:
            if steering.rows is None or len(steering.rows) != like.shape[0]:
                raise TuError("Sample-level CMRM vectors need Steering.select(rows) for each batch (one row per input).")
            vec = vec[steering.rows].unsqueeze(1)
        return alpha * vec.to(like)  # the layer's dtype and device (GPU presets)

    def hook_for(vec):
        def hook(module, args, output):
            if isinstance(output, tuple):  # older layer API: (hidden, ...)
                return (output[0] - shift(vec, output[0]),) + output[1:]
            return output - shift(vec, output)
        return hook

    try:
        for layer, vec in vectors.items():
            handles.append(blocks[layer % len(blocks)].register_forward_hook(hook_for(vec), prepend=True))
        yield steering
    finally:
        for h in handles:
            h.remove()
