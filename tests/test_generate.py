"""The greedy loop of `generate` (shared prefix cache, continuous batching) against one prompt at a time
through `model.generate`, on the tiny random `micro` preset. Speed is measured by benchmarks/bench_generate.py."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from notebook_helpers import perturbed
from PIL import Image

from tu_lib.core import TuError
from tu_lib.models import generate as G

PROMPTS = ["What is shown in this image?", "Hi", "Describe the picture in one sentence, please.", "Count",
           "Name three colours you can see and say which one covers the largest part of it.", "Why?"]


def _images(n):
    base = [Image.new("RGB", (150, 120), (200, 30, 30)), Image.new("RGB", (112, 112), (0, 0, 200)),
            Image.effect_noise((120, 130), 64).convert("RGB"), Image.new("RGB", (90, 200), (0, 250, 0))]
    return [base[i % len(base)] for i in range(n)]


def _inputs(micro, kind):
    """Texts and images: text-only, image-only, or mixed (every other input has an image)."""
    with_image = {"text": [False] * 6, "image": [True] * 6, "mixed": [i % 2 == 0 for i in range(6)]}[kind]
    texts = [micro.chat(p, w) for p, w in zip(PROMPTS, with_image)]
    images = [im if w else None for im, w in zip(_images(6), with_image)]
    return texts, images


@pytest.fixture
def early_eos(micro):
    """A generation config whose EOS is a token the random model emits often, so rows finish at different
    steps (the random micro model rarely emits its real EOS): rows leave and join the batch."""
    texts, images = _inputs(micro, "mixed")
    answers = G.generate_per_sample(micro.model, micro.processor, texts, images, max_new_tokens=12)
    ids = micro.processor.tokenizer([a for a in answers if a], add_special_tokens=False)["input_ids"]
    common = max({t for row in ids for t in row}, key=lambda t: sum(row.count(t) for row in ids))
    before = micro.model.generation_config
    micro.model.generation_config = copy.deepcopy(before)
    micro.model.generation_config.eos_token_id = common
    yield
    micro.model.generation_config = before


def _per_sample(micro, texts, images, n):
    return G.generate_per_sample(micro.model, micro.processor, texts, images, max_new_tokens=n)


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
@pytest.mark.parametrize("batch_size", [1, 2, 4, 16])
def test_generate_equals_one_prompt_at_a_time(micro, kind, batch_size):
    texts, images = _inputs(micro, kind)
    assert G.generate(micro.model, micro.processor, texts, images, max_new_tokens=9, batch_size=batch_size) == \
        _per_sample(micro, texts, images, 9)


@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_rows_finishing_at_different_steps(micro, early_eos, batch_size):
    texts, images = _inputs(micro, "mixed")
    reference = _per_sample(micro, texts, images, 12)
    lengths = {len(micro.processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in reference}
    assert len(lengths) > 1, "the fixture should make rows end at different steps"
    assert G.generate(micro.model, micro.processor, texts, images, max_new_tokens=12, batch_size=batch_size) == reference
    assert G.generate_reference(micro.model, micro.processor, texts, images, max_new_tokens=12,
                                batch_size=batch_size) == reference


@pytest.mark.parametrize("n", [1, 2])
def test_few_new_tokens(micro, n):
    texts, images = _inputs(micro, "mixed")
    assert G.generate(micro.model, micro.processor, texts, images, max_new_tokens=n, batch_size=4) == \
        _per_sample(micro, texts, images, n)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_max_new_tokens_is_refused(micro, bad):
    with pytest.raises(TuError, match="max_new_tokens"):
        G.generate(micro.model, micro.processor, ["x"], max_new_tokens=bad)


def test_no_inputs(micro):
    assert G.generate(micro.model, micro.processor, [], max_new_tokens=4) == []


def test_shared_prefix_is_the_chat_head_and_stops_before_the_image(micro):
    texts, _ = _inputs(micro, "mixed")
    prefix = G._common_prefix(micro.model, micro.processor, texts)
    full = micro.processor.tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    assert 0 < len(prefix) < len(full) and full[:len(prefix)] == prefix
    assert micro.model.config.image_token_id not in prefix
    one = G._common_prefix(micro.model, micro.processor, [texts[1]])  # one input keeps its last token
    assert one == full[:-1]


def test_before_batch_sees_the_rows_of_every_forward_pass(micro, early_eos):
    """Per-input steering needs each forward pass's rows: the hook is called before every pass (prompt and
    decode steps) with exactly the input indices of that pass's batch rows, in order."""
    texts, images = _inputs(micro, "mixed")
    calls, sizes = [], []
    layer = micro.decoder_layers()[0]
    handle = layer.register_forward_hook(lambda m, a, out: sizes.append((out[0] if isinstance(out, tuple) else out).shape[0]))
    try:
        answers = G.generate(micro.model, micro.processor, texts, images, max_new_tokens=12, batch_size=3,
                             before_batch=lambda rows: calls.append(list(rows)))
    finally:
        handle.remove()
    assert [len(c) for c in calls] == sizes
    assert {i for c in calls for i in c} == set(range(len(texts)))
    assert all(len(c) <= 3 for c in calls)
    assert answers == _per_sample(micro, texts, images, 12)


def test_generation_config_the_loop_does_not_run_falls_back(micro):
    """A processor that reads the sequence (here a repetition penalty) sends decoding to `model.generate`."""
    texts, images = _inputs(micro, "mixed")
    before = micro.model.generation_config
    micro.model.generation_config = copy.deepcopy(before)
    micro.model.generation_config.repetition_penalty = 1.5
    try:
        assert G._greedy_setup(micro.model) is None
        assert G.generate(micro.model, micro.processor, texts, images, max_new_tokens=6, batch_size=4) == \
            _per_sample(micro, texts, images, 6)
    finally:
        micro.model.generation_config = before
    assert G._greedy_setup(micro.model) is not None


def test_dataset_level_hook_applies_to_the_shared_prefix(micro):
    """A hook active during `generate` also shapes the prefix cache (computed inside the call): the same
    answers as one prompt at a time under the same hook."""
    texts, images = _inputs(micro, "mixed")
    layer = micro.decoder_layers()[1]
    vec = torch.randn(micro.base_model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    handle = layer.register_forward_hook(lambda m, a, out: out - vec, prepend=True)
    try:
        steered = G.generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
        assert steered == _per_sample(micro, texts, images, 8)
    finally:
        handle.remove()
    assert steered != G.generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)


def test_admit_groups_one_modality_of_similar_length():
    """A prefill group is left-padded to its longest prompt: `_admit` takes prompts from the head of the (length-
    sorted) queue while they share the first one's modality, fit in the free rows and are at most MAX_LENGTH_RATIO
    times its length; the rest wait for a later group."""
    texts = ["a" * 10, "a" * 12, "a" * 15, "a" * 16, "a" * 40, "b" * 12]
    images = [None, None, None, None, None, "image"]
    queue = [0, 1, 2, 3, 4, 5]
    assert G._admit(queue, texts, images, free=8) == [0, 1, 2]  # 16 > 1.5 x 10
    assert G._admit(queue, texts, images, free=8) == [3]  # 40 > 1.5 x 16
    assert G._admit(queue, texts, images, free=1) == [4]
    assert G._admit(queue, texts, images, free=8) == [5]  # the other modality starts its own group
    assert queue == []
    queue = [0, 1, 2]
    assert G._admit(queue, texts, images, free=2) == [0, 1] and queue == [2]  # no more rows than are free


def test_growing_cache_layer_holds_what_dynamic_layer_holds(monkeypatch):
    """`GrowingLayer` (in-place appends) against HF's DynamicLayer (a cat per append) through every operation the
    greedy loop performs: a prefill chunk, single-token steps past the buffer's headroom (a reallocation), rows
    leaving, the prefix's repeat, and a join of two row sets left-padded to a common width. New buffers start as NaN
    here, so a position the views expose without writing it (e.g. a join's padding) shows."""
    from transformers.cache_utils import DynamicLayer

    from tu_lib.models import kv_cache

    allocate = kv_cache.GrowingLayer._allocate
    monkeypatch.setattr(kv_cache.GrowingLayer, "_allocate",
                        lambda self, *a: tuple(t.fill_(float("nan")) for t in allocate(self, *a)))
    torch.manual_seed(0)

    def kv(b, n):
        return torch.randn(b, 3, n, 8), torch.randn(b, 3, n, 8)

    grow, ref = kv_cache.GrowingLayer(), DynamicLayer()
    for chunk in [kv(4, 7)] + [kv(4, 1) for _ in range(kv_cache.HEADROOM + 5)]:
        got, want = grow.update(*chunk), ref.update(*chunk)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    keep = torch.tensor([0, 2, 3])
    grow.batch_select_indices(keep), ref.batch_select_indices(keep)
    grow.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    assert torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values)

    other_grow, other_ref = kv_cache.GrowingLayer(), DynamicLayer()
    chunk = kv(2, 30)
    other_grow.update(*chunk), other_ref.update(*chunk)
    width = max(grow.get_seq_length(), 30) + 3
    grow.join_left_padded(other_grow, width)

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))

    assert torch.equal(grow.keys, torch.cat([pad(ref.keys), pad(other_ref.keys)]))
    assert torch.equal(grow.values, torch.cat([pad(ref.values), pad(other_ref.values)]))


def test_growing_cache_layer_appends_in_place():
    """The point of GrowingLayer: a decode step writes into the buffer it already has (no copy of the whole cache per
    step, which took a third of stage 03's generation time with DynamicLayer) until the headroom is used up."""
    from tu_lib.models import kv_cache

    layer = kv_cache.GrowingLayer()
    layer.update(torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 5, 8))
    buffer = layer._keys.data_ptr()
    for _ in range(kv_cache.HEADROOM):
        keys, _ = layer.update(torch.ones(2, 3, 1, 8), torch.ones(2, 3, 1, 8))
        assert keys.data_ptr() == buffer
    layer.update(torch.ones(2, 3, 1, 8), torch.ones(2, 3, 1, 8))
    assert layer._keys.data_ptr() != buffer and layer.get_seq_length() == 5 + kv_cache.HEADROOM + 1


def test_generate_with_reallocating_caches_equals_one_prompt_at_a_time(micro, early_eos, monkeypatch):
    """With no headroom every append reallocates the buffers: the answers stay those of one prompt at a time."""
    from tu_lib.models import kv_cache

    monkeypatch.setattr(kv_cache, "HEADROOM", 0)
    texts, images = _inputs(micro, "mixed")
    assert G.generate(micro.model, micro.processor, texts, images, max_new_tokens=12, batch_size=3) == \
        _per_sample(micro, texts, images, 12)


def _jsonl_items(micro):
    texts, images = _inputs(micro, "mixed")
    return [{"key": i, "text": t, "image": im} for i, (t, im) in enumerate(zip(texts, images))]


def _counting_replays(store):
    """The input keys of every replayed prefill of `store`, appended as they happen."""
    replays, original = [], store.replaying
    store.replaying = lambda model, keys, width: replays.append(keys) or original(model, keys, width)
    return replays


def test_replayed_lower_layers_give_the_answers_of_a_full_prefill(micro, tmp_path):
    """A second model whose lower layers equal the first's prefills only its upper layers from the stored states:
    the answers equal those of its own full prefill (here the upper layers are perturbed, so the answers differ from the
    first model's and the replay must carry the upper layers' own computation)."""
    from tu_lib.models.lower_layers import SharedLowerLayers

    items, layers = _jsonl_items(micro), micro.decoder_layers()
    k = len(layers) // 2
    store = SharedLowerLayers(k)
    run = functools.partial(G.generate_jsonl, micro.model, micro.processor, items, max_new_tokens=9, batch_size=3)
    first = run(tmp_path / "first.jsonl", lower=store)
    assert len(store.states) == len(items)
    replays = _counting_replays(store)
    with perturbed(layers[k]):
        full = run(tmp_path / "full.jsonl")
        replayed = run(tmp_path / "replay.jsonl", lower=store)
    assert replayed == full and full != first
    assert sorted(key for keys in replays for key in keys) == sorted(store.states)  # every input replayed


def test_lower_layers_of_other_weights_or_with_hooks_are_not_replayed(micro, tmp_path):
    from tu_lib.models.lower_layers import SharedLowerLayers

    items, layers = _jsonl_items(micro), micro.decoder_layers()
    store = SharedLowerLayers(len(layers) // 2)
    run = functools.partial(G.generate_jsonl, micro.model, micro.processor, items, max_new_tokens=9, batch_size=3)
    first = run(tmp_path / "first.jsonl", lower=store)
    replays = _counting_replays(store)
    with perturbed(layers[0]):
        assert not store.usable_with(micro.model)
        full = run(tmp_path / "full.jsonl")
        other = run(tmp_path / "other.jsonl", lower=store)
    assert other == full and full != first and not replays
    assert store.usable_with(micro.model)  # the same weights again
    hook = layers[0].mlp.register_forward_hook(lambda module, args, output: output)  # e.g. a steering hook
    try:
        assert not store.usable_with(micro.model)
    finally:
        hook.remove()


def test_a_full_store_leaves_the_rest_to_full_prefills(micro, tmp_path):
    """Inputs beyond the store's byte budget are not stored: they prefill in full for every model, the answers the same."""
    from tu_lib.models.lower_layers import SharedLowerLayers

    items, layers = _jsonl_items(micro), micro.decoder_layers()
    k = len(layers) // 2
    probe = SharedLowerLayers(k)
    run = functools.partial(G.generate_jsonl, micro.model, micro.processor, items, max_new_tokens=9, batch_size=3)
    run(tmp_path / "probe.jsonl", lower=probe)
    store = SharedLowerLayers(k, max_bytes=probe.bytes // 2)
    run(tmp_path / "first.jsonl", lower=store)
    assert 0 < len(store.states) < len(items) and store.bytes <= store.max_bytes
    with perturbed(layers[k]):
        assert run(tmp_path / "replay.jsonl", lower=store) == run(tmp_path / "full.jsonl")
