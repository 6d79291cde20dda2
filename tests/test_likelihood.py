"""Shared-prompt continuation scoring equals a plain forward over prompt + continuation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tu_lib.core import TuError
from tu_lib.models.likelihood import continuation_logprobs


def _plain(model, prompt, cont):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + cont])).logits[0].float(), -1)
    return logp[len(prompt) - 1:-1].gather(1, torch.tensor(cont)[:, None])[:, 0].numpy()


def test_matches_plain_forward_across_padding_and_chunks(micro):
    g = torch.Generator().manual_seed(0)
    vocab = micro.model.config.text_config.vocab_size
    rand = lambda n: torch.randint(5, vocab - 5, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(n) for n in (3, 9, 5, 12)]
    conts = [[rand(n) for n in lens] for lens in ([4, 1, 0], [7], [2, 6, 3], [5, 5])]
    # batch 3 mixes prompt lengths (left padding); a 10-token chunk budget splits the continuation rows
    out = continuation_logprobs(micro.model, prompts, conts, batch_size=3, max_tokens_per_chunk=10)
    assert [[len(o) for o in row] for row in out] == [[len(c) for c in row] for row in conts]
    for p, cs, os in zip(prompts, conts, out):
        for c, o in zip(cs, os):
            if c:
                assert np.allclose(o, _plain(micro.model, p, c), atol=1e-4)
    assert (np.concatenate([o for row in out for o in row]) < 0).all()


def test_bad_inputs_are_named(micro):
    with pytest.raises(TuError, match="zero tokens"):
        continuation_logprobs(micro.model, [[]], [[[1, 2]]])
    with pytest.raises(TuError, match="one list per prompt"):
        continuation_logprobs(micro.model, [[1, 2]], [])


def _scoring_inputs(micro, seed=1):
    g = torch.Generator().manual_seed(seed)
    vocab = micro.model.config.text_config.vocab_size
    rand = lambda n: torch.randint(5, vocab - 5, (n,), generator=g).tolist()  # noqa: E731
    return [rand(n) for n in (3, 9, 5, 12)], [[rand(n) for n in lens] for lens in ([4, 1, 0], [7], [2, 6, 3], [5, 5])]


def test_a_forward_tape_replays_the_shared_layers_with_the_same_numbers(micro):
    """A second model sharing the lower layers replays them from the first model's tape: its log-probs equal, bit
    for bit, those it computes alone (its upper layer differs, so they differ from the first model's)."""
    from notebook_helpers import perturbed

    from tu_lib.models.lower_layers import ForwardTape

    prompts, conts = _scoring_inputs(micro)
    layers = micro.decoder_layers()
    tape = ForwardTape(len(layers) // 2)
    score = lambda **kw: continuation_logprobs(micro.model, prompts, conts, batch_size=3, max_tokens_per_chunk=10, **kw)  # noqa: E731
    first = score(tape=tape)
    recorded = len(tape.calls)
    assert recorded >= 4  # two prompt batches and their continuation chunks
    swaps = []
    original = tape._swapped
    tape._swapped = lambda *a: swaps.append(1) or original(*a)
    with perturbed(layers[len(layers) // 2]):
        alone, replayed = score(), score(tape=tape)
    flat = lambda out: np.concatenate([o for row in out for o in row])  # noqa: E731
    assert np.array_equal(flat(replayed), flat(alone)) and not np.array_equal(flat(alone), flat(first))
    assert len(swaps) == recorded and len(tape.calls) == recorded  # every pass replayed, none recorded again
    # other inputs, or other weights below the shared boundary: the tape is not used
    other = _scoring_inputs(micro, seed=2)
    assert np.array_equal(flat(continuation_logprobs(micro.model, *other, batch_size=3, max_tokens_per_chunk=10, tape=tape)),
                          flat(continuation_logprobs(micro.model, *other, batch_size=3, max_tokens_per_chunk=10)))
    with perturbed(layers[0]):
        assert np.array_equal(flat(score(tape=tape)), flat(score()))
    assert len(swaps) == recorded


def test_a_full_tape_replays_its_recorded_prefix_and_runs_the_rest(micro):
    from notebook_helpers import perturbed

    from tu_lib.models.lower_layers import ForwardTape

    prompts, conts = _scoring_inputs(micro)
    layers = micro.decoder_layers()
    k = len(layers) // 2
    score = lambda **kw: continuation_logprobs(micro.model, prompts, conts, batch_size=3, max_tokens_per_chunk=10, **kw)  # noqa: E731
    probe = ForwardTape(k)
    score(tape=probe)
    tape = ForwardTape(k, max_bytes=probe.bytes // 2)
    score(tape=tape)
    assert 0 < len(tape.calls) < len(probe.calls)
    flat = lambda out: np.concatenate([o for row in out for o in row])  # noqa: E731
    with perturbed(layers[k]):
        assert np.array_equal(flat(score(tape=tape)), flat(score()))
    assert 0 < len(tape.calls) < len(probe.calls)  # nothing recorded out of order
