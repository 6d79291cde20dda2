"""Prefill states of the decoder layers that every evaluated model shares, computed once per input.

Why: stage 02 trains LoRA on the decoder layers from `lora_first_layer` on (15 of the organism's 30), so for stage 03's
26 models (base, training-curve points, picks) the embeddings, the vision tower, the projector and layers 0..k-1
compute the same states for a prompt, and they are about half of every prefill. `SharedLowerLayers` records, during
the first model's prefill of an input, layers 0..k-1's keys and values and layer k-1's output over the input's own
tokens (those after the shared chat prefix). A later model whose shared part has the same weights (`usable_with`:
a hash of them) prefills only layers k.. from those: in its prefill, decoder layers 0..k-1 are swapped for `_Replay`
modules that write the stored keys/values into the cache and hand on the stored output, and the vision tower is not
run. The stored states were computed in other batches (other widths and neighbours), so a replayed prefill may differ
from a full one in the last bits, as any change of batch layout may: every answer of stage 03's validation and test
generations was compared against the full prefill's when this was introduced (README, "Speed").
`ForwardTape` does the same for continuation scoring (TruthfulQA MC1), whose passes are the same whatever the model:
it replays them pass by pass, so there the numbers are bit-identical.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

from .adapters import unwrapped
from .generate import weights_fingerprint


def _decoder_layers(model):
    return unwrapped(model).model.language_model.layers


MAX_BYTES = 4 * 2**30  # per store: the organism's 329 test items need 0.64 GB (measured); LLaVA-7B's would need far more


def _changes_output(hook) -> bool:
    """Whether a forward (pre-)hook may change what its module computes: any hook but transformers' own
    output-capturing ones (installed on the first forward, they only read outputs when hidden states are asked for)."""
    return not getattr(hook, "__module__", "").startswith("transformers.utils.output_capturing")


def _shared_modules(model, layers: int) -> list[tuple[str, torch.nn.Module]]:
    inner = unwrapped(model).model
    lm = inner.language_model
    parts = [("embed_tokens", lm.embed_tokens), ("vision_tower", inner.vision_tower),
             ("projector", inner.multi_modal_projector)]
    return parts + [(f"layer{i}", lm.layers[i]) for i in range(layers)]


def shared_identity(model, layers: int) -> str:
    """An identity of the part below decoder layer `layers`: each part's weights_fingerprint (names relative to the
    part, so a peft wrapper's prefix does not matter; a LoRA module inside a shared layer adds parameters and so
    changes it). About 0.35 s for the organism's 92 M shared parameters."""
    parts = "|".join(f"{name}:{weights_fingerprint(module)}" for name, module in _shared_modules(model, layers))
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


class _SharedPart:
    """States of decoder layers 0..k-1 recorded with one model and replayed into another whose shared part has the
    same weights (`usable_with`)."""

    def __init__(self, layers: int, max_bytes: int = MAX_BYTES):
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers, self.max_bytes = layers, max_bytes
        self.identity: str | None = None
        self.bytes = 0  # held by the stored states

    def _room_for(self, tensors: list[torch.Tensor]) -> bool:
        """Count `tensors` against max_bytes when they fit (they are then to be stored), else False (not stored)."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self.bytes + size > self.max_bytes:
            return False
        self.bytes += size
        return True

    def usable_with(self, model) -> bool:
        """True when `model`'s shared part has the weights the stored states came from (the first model asked fixes
        them) and no forward hook of it could change its states (e.g. a steering hook): else the model must compute
        those layers itself."""
        if any(_changes_output(hook) for _, part in _shared_modules(model, self.layers) for m in part.modules()
               for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]):
            return False
        identity = shared_identity(model, self.layers)
        if self.identity is None:
            self.identity = identity
        return identity == self.identity

    @contextlib.contextmanager
    def _swapped(self, model, ks: list[torch.Tensor], vs: list[torch.Tensor], hidden: torch.Tensor):
        """Decoder layers 0..k-1 are _Replay modules (writing ks/vs into the cache, handing on `hidden`) for the
        block."""
        layers = _decoder_layers(model)
        saved = [layers[i] for i in range(self.layers)]
        try:
            for i in range(self.layers):
                layers[i] = _Replay(i, i == self.layers - 1, ks[i], vs[i], hidden)
            yield
        finally:
            for i, layer in enumerate(saved):
                layers[i] = layer


class SharedLowerLayers(_SharedPart):
    """Per input (its hash): layers 0..k-1's keys/values and layer k-1's output over the input's own tokens, for
    generation (models.generate), whose batches differ between models (rows leave as they finish).

    Memory: on stage 03's 329 default test items 0.64 GB (measured 2026-12-07); the store lives as long as the
    generation of one set of items for several models (evaluation.judging.generate_models). Inputs beyond
    `max_bytes` are not stored (they prefill in full for every model), so a large model does not run out of memory."""

    def __init__(self, layers: int, max_bytes: int = MAX_BYTES):
        super().__init__(layers, max_bytes)
        self.states: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}

    def has(self, keys: list[str]) -> bool:
        return all(k in self.states for k in keys)

    @contextlib.contextmanager
    def recording(self, model, keys: list[str], cache, own_lengths: list[int]):
        """Around a full prefill of a left-padded batch: afterwards each row's own positions (its last
        `own_lengths[b]`) of layers 0..k-1's cache and of layer k-1's output are stored under the row's key."""
        seen = {}
        hook = _decoder_layers(model)[self.layers - 1].register_forward_hook(
            lambda module, args, output: seen.__setitem__("hidden", output))
        try:
            yield
        finally:
            hook.remove()
        hidden = seen["hidden"]
        for b, (key, n) in enumerate(zip(keys, own_lengths)):
            if key not in self.states:
                ks = [cache.layers[i].keys[b, :, -n:] for i in range(self.layers)]
                vs = [cache.layers[i].values[b, :, -n:] for i in range(self.layers)]
                if self._room_for([*ks, *vs, hidden[b, -n:]]):  # else this input prefills in full for every model
                    self.states[key] = ([k.clone() for k in ks], [v.clone() for v in vs], hidden[b, -n:].clone())

    def _batch(self, keys: list[str], width: int):
        """(keys per layer, values per layer, output): the inputs' stored states left-padded with zeros to `width`."""
        first_k, _, first_h = self.states[keys[0]]
        shape = (len(keys), first_k[0].shape[0], width, first_k[0].shape[2])
        ks = [first_k[0].new_zeros(shape) for _ in range(self.layers)]
        vs = [first_k[0].new_zeros(shape) for _ in range(self.layers)]
        hidden = first_h.new_zeros((len(keys), width, first_h.shape[1]))
        for b, key in enumerate(keys):
            k_i, v_i, h_i = self.states[key]
            n = h_i.shape[0]
            for i in range(self.layers):
                ks[i][b, :, width - n:] = k_i[i]
                vs[i][b, :, width - n:] = v_i[i]
            hidden[b, width - n:] = h_i
        return ks, vs, hidden

    @contextlib.contextmanager
    def replaying(self, model, keys: list[str], width: int):
        """Around a prefill of the stored inputs `keys` (left-padded to `width`, without pixel_values): decoder
        layers 0..k-1 are _Replay modules for its duration."""
        with self._swapped(model, *self._batch(keys, width)):
            yield


class ForwardTape(_SharedPart):
    """Layers 0..k-1's keys/values and layer k-1's output of every forward pass of a sequence that is the same
    whatever the model: continuation scoring (models.likelihood), whose batches and chunks depend only on its inputs.
    The first model records the sequence; a later one given the same inputs (`start`) replays every pass, so its
    numbers are bit-identical to computing those layers itself (the same shapes and weights, computed once)."""

    def __init__(self, layers: int, max_bytes: int = MAX_BYTES):
        super().__init__(layers, max_bytes)
        self.signature: str | None = None
        self.calls: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = []
        self.position = 0

    def start(self, model, inputs) -> bool:
        """Begin a model's pass through the sequence that `inputs` (anything with a stable repr, e.g. the token
        lists and batch sizes) determine: True when the tape records it (the first model) or replays it (same inputs,
        same shared weights), False when it cannot serve this model."""
        signature = hashlib.sha256(repr(inputs).encode()).hexdigest()
        if (self.signature is not None and signature != self.signature) or not self.usable_with(model):
            return False
        self.signature, self.position = signature, 0
        return True

    @contextlib.contextmanager
    def forward(self, model, input_ids: torch.Tensor):
        """Around the sequence's next forward pass (text only): replayed when recorded, else recorded."""
        index, self.position = self.position, self.position + 1
        if index < len(self.calls):
            recorded, ks, vs, hidden = self.calls[index]
            if not torch.equal(recorded, input_ids):
                raise RuntimeError("ForwardTape: a pass differs from the recorded sequence although its inputs are "
                                   "the same; the caller's batching must depend on its inputs only.")
            with self._swapped(model, ks, vs, hidden):
                yield
            return
        if index > len(self.calls) or self.bytes >= self.max_bytes:  # the tape is full: the rest runs in full
            self.bytes = self.max_bytes
            yield
            return
        n = input_ids.shape[1]
        ks, vs, seen = [None] * self.layers, [None] * self.layers, {}

        def keep(i):
            def hook(module, args, kwargs, output):
                layer = kwargs["past_key_values"].layers[i]
                ks[i], vs[i] = layer.keys[:, :, -n:].clone(), layer.values[:, :, -n:].clone()
                if i == self.layers - 1:
                    seen["hidden"] = (output[0] if isinstance(output, tuple) else output).clone()
            return hook

        layers = _decoder_layers(model)
        hooks = [layers[i].register_forward_hook(keep(i), with_kwargs=True) for i in range(self.layers)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        if self._room_for([*ks, *vs, seen["hidden"]]):
            self.calls.append((input_ids.clone(), ks, vs, seen["hidden"]))
        else:
            self.bytes = self.max_bytes  # no later pass is recorded: the replayed ones must stay a prefix


class _Replay(torch.nn.Module):
    """Stands in for decoder layer `index` in one prefill: writes the stored keys/values into the cache; the last
    shared layer returns the stored output (earlier ones pass their input on, which nothing reads)."""

    def __init__(self, index: int, last: bool, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor):
        super().__init__()
        self.index, self.last, self.k, self.v, self.hidden = index, last, keys, values, hidden

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        past_key_values.update(self.k, self.v, self.index)
        return self.hidden if self.last else hidden_states
