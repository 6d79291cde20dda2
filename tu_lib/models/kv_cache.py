"""A KV cache whose decode steps write in place, for `generate`'s greedy loop.

HF's DynamicLayer appends a step's keys and values with `torch.cat`, which copies the layer's whole cache on every
decode step of every layer: on stage 03's 94 validation items that copying was a third of the generation's CPU time
(13 of 40 s in a profile, 2026-12-07), more than attention. `GrowingLayer` keeps each layer's keys and values in a
buffer with room for `HEADROOM` more positions and writes a step into it; `keys` and `values` are views of the filled
part, so attention sees tensors of the same shape and content as with DynamicLayer (only the batch and head strides
differ) and the greedy answers are the same (benchmarks/bench_generate.py checks it on every run).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Free positions a buffer is (re)allocated with: a row of stage 03 lives at most max_new_tokens (32) decode steps in a
# batch, and a join rebuilds the buffers anyway, so most layers are allocated once or twice per batch.
HEADROOM = 64


class GrowingLayer(DynamicLayer):
    """DynamicLayer with in-place appends: `_keys`/`_values` hold [batch, heads, capacity, head_dim], of which the
    first `keys.shape[-2]` positions are filled; `keys`/`values` are views of them."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys = self._values = None

    def _set(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        """Take `keys`/`values` (positions beyond `filled` are free) as the buffers."""
        self._keys, self._values = keys, values
        self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]

    def _allocate(self, like: torch.Tensor, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New, uninitialised buffers: the caller writes every position it exposes through the views (a join's left
        padding too: masked, but a masked position's value still enters attention's weighted sum with weight 0, so it
        must not be NaN)."""
        shape = (batch, like.shape[1], capacity, like.shape[3])
        return like.new_empty(shape), like.new_empty(shape)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled, new = self.get_seq_length(), key_states.shape[-2]
        if self._keys is None or filled + new > self._keys.shape[-2]:
            keys, values = self._allocate(key_states, key_states.shape[0], filled + new + HEADROOM)
            if filled:
                keys[..., :filled, :] = self.keys
                values[..., :filled, :] = self.values
            self._set(keys, values, filled)
        self._keys[..., filled:filled + new, :] = key_states
        self._values[..., filled:filled + new, :] = value_states
        self._set(self._keys, self._values, filled + new)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            filled = self.get_seq_length()
            self._set(self._keys.repeat_interleave(repeats, dim=0), self._values.repeat_interleave(repeats, dim=0), filled)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._set(self._keys[indices, ...], self._values[indices, ...], self.get_seq_length())

    def join_left_padded(self, other: "GrowingLayer", width: int) -> None:
        """This layer's rows, then `other`'s, each left-padded with zeros to `width` positions (masked by the caller),
        in one new buffer."""
        b1 = self.keys.shape[0]
        keys, values = self._allocate(self.keys, b1 + other.keys.shape[0], width + HEADROOM)
        for rows, layer in ((slice(None, b1), self), (slice(b1, None), other)):
            pad = width - layer.get_seq_length()
            for buffer, part in ((keys, layer.keys), (values, layer.values)):
                buffer[rows, :, :pad] = 0  # masked, but must not be NaN (_allocate)
                buffer[rows, :, pad:width] = part
        self._set(keys, values, width)


def new_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers append in place (other layer kinds, e.g. sliding
    windows, keep HF's own class)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def join_left_padded(cache: DynamicCache, other: DynamicCache, width: int) -> None:
    """`cache` becomes its rows followed by `other`'s, every layer left-padded to `width` positions."""
    for mine, theirs in zip(cache.layers, other.layers):
        if isinstance(mine, GrowingLayer) and isinstance(theirs, GrowingLayer):
            mine.join_left_padded(theirs, width)
            continue

        def pad(t):  # left-pad the position dimension to `width` with zeros
            return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))

        mine.keys = torch.cat([pad(mine.keys), pad(theirs.keys)])
        mine.values = torch.cat([pad(mine.values), pad(theirs.values)])
