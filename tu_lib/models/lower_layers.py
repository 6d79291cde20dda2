"""Prefill states of the decoder layers every evaluated model shares, computed once per input (WORK IN PROGRESS).

Stage 02 trains LoRA on the decoder layers from `lora_first_layer` on (15 of the organism's 30), so for stage 03's 26
models (base, curve points, picks) the embeddings, the vision tower, the projector and layers 0..k-1 compute the same
states for a prompt. `SharedLowerLayers` records, during the first model's prefill of an input, layer 0..k-1's keys and
values and layer k-1's output for the input's own tokens (after the shared chat prefix); a later model whose shared
part has the same weights prefills only layers k.. from them: its prefill's decoder layers 0..k-1 are swapped for
`_Replay` modules that write the stored keys/values into the cache and hand on the stored states (no pixel_values:
the tower is not run). Measured with a prototype (2026-12-07): prefill 51.9 -> 28.1 s on stage 03's 329 test items for
textual_ga, every answer equal to the normal path's.
"""
from __future__ import annotations

import hashlib

import torch


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _shared_modules(model, layers: int) -> list[tuple[str, torch.nn.Module]]:
    inner = _inner(model).model
    lm = inner.language_model
    parts = [("embed_tokens", lm.embed_tokens), ("vision_tower", inner.vision_tower),
             ("projector", inner.multi_modal_projector)]
    return parts + [(f"layer{i}", lm.layers[i]) for i in range(layers)]


@torch.no_grad()
def shared_identity(model, layers: int) -> str:
    """SHA-256 over the shared part's parameters (names relative to their module, so a peft wrapper's prefix does not
    matter; a LoRA module inside a shared layer adds parameters and so changes it)."""
    h = hashlib.sha256()
    for part, module in _shared_modules(model, layers):
        for name, t in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            h.update(f"{part}.{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class SharedLowerLayers:
    """Per input (its hash): layer 0..k-1 keys/values and layer k-1's output over the input's own tokens."""

    def __init__(self, layers: int):
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = layers
        self.identity: str | None = None
        self.states: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}

    def usable_with(self, model) -> bool:
        """True when `model`'s shared part has the weights the stored states came from (the first model fixes them)."""
        identity = shared_identity(model, self.layers)
        if self.identity is None:
            self.identity = identity
        return identity == self.identity

    def record(self, keys: list[str], cache, hidden: torch.Tensor, own_lengths: list[int]) -> None:
        """Store each row's own positions (the last `own_lengths[b]` of the batch, which is left-padded)."""
        for b, (key, n) in enumerate(zip(keys, own_lengths)):
            if key in self.states:
                continue
            ks = [cache.layers[i].keys[b, :, -n:].clone() for i in range(self.layers)]
            vs = [cache.layers[i].values[b, :, -n:].clone() for i in range(self.layers)]
            self.states[key] = (ks, vs, hidden[b, -n:].clone())

    def has(self, keys: list[str]) -> bool:
        return all(k in self.states for k in keys)

    def batch(self, keys: list[str], width: int):
        """(keys per layer, values per layer, states): the inputs' stored states left-padded with zeros to `width`."""
        first_k, _, first_h = self.states[keys[0]]
        B = len(keys)
        ks = [first_k[0].new_zeros((B, first_k[0].shape[0], width, first_k[0].shape[2])) for _ in range(self.layers)]
        vs = [k.clone() for k in ks]
        hidden = first_h.new_zeros((B, width, first_h.shape[1]))
        for b, key in enumerate(keys):
            k_i, v_i, h_i = self.states[key]
            n = h_i.shape[0]
            for i in range(self.layers):
                ks[i][b, :, width - n:] = k_i[i]
                vs[i][b, :, width - n:] = v_i[i]
            hidden[b, width - n:] = h_i
        return ks, vs, hidden


class _Replay(torch.nn.Module):
    """Stands in for decoder layer `index` in one prefill: writes the stored keys/values into the cache; the last
    shared layer returns the stored output (earlier ones pass their input on, which nothing reads)."""

    def __init__(self, index: int, last: bool, keys, values, hidden):
        super().__init__()
        self.index, self.last, self.k, self.v, self.hidden = index, last, keys, values, hidden

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        past_key_values.update(self.k, self.v, self.index)
        return self.hidden if self.last else hidden_states


class replaying:
    """Context manager: decoder layers 0..k-1 of `model` replaced by _Replay modules for one forward pass."""

    def __init__(self, model, store: SharedLowerLayers, ks, vs, hidden):
        self.layers = _inner(model).model.language_model.layers
        self.store, self.parts = store, (ks, vs, hidden)

    def __enter__(self):
        ks, vs, hidden = self.parts
        k = self.store.layers
        self.saved = [self.layers[i] for i in range(k)]
        for i in range(k):
            self.layers[i] = _Replay(i, i == k - 1, ks[i], vs[i], hidden)
        return self

    def __exit__(self, *exc):
        for i, layer in enumerate(self.saved):
            self.layers[i] = layer
        return False
