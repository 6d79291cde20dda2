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
