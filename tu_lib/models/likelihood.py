"""Log-probabilities of continuations that share a prompt, with the prompt run once.

Why: TruthfulQA MC1 scores 2-13 answer options per question, and the fluency judge scores every model's
answer to the same prompt (T3's jailbreak templates run to ~800 tokens). Running the prompt again for each
continuation was most of stage 03's judging time. Here a batch of prompts is run once (left-padded, with
explicit positions), its key/value cache is copied to one row per continuation, and only the continuations
are run on top. The numbers equal a plain forward over prompt + continuation up to float rounding.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from ..core.errors import TuError

__all__ = ["continuation_logprobs"]


def _select_cache(cache, rows: torch.Tensor):
    """A new DynamicCache holding `cache`'s rows `rows` (the source stays untouched for the next chunk)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), layer_idx)
    return out


@torch.inference_mode()
def continuation_logprobs(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], *,
                          batch_size: int = 8, max_tokens_per_chunk: int = 2048,
                          pad_id: int | None = 0, tape=None) -> list[list[np.ndarray]]:
    """out[i][j] = log p(token t of continuations[i][j] | prompts[i], earlier tokens), one float per token.

    `prompts[i]` are token ids (non-empty), `continuations[i]` a list of token-id lists scored after it; an
    empty continuation gives an empty array. `model` is any causal LM (or LLaVA without images) whose forward
    takes input_ids, attention_mask, position_ids, past_key_values and logits_to_keep. Continuation rows run
    in chunks of at most `max_tokens_per_chunk` tokens, which bounds the logits' memory (vocab x tokens).
    `tape`: a lower_layers.ForwardTape shared by several models with the same lower layers scoring the same inputs
    (the first records, the others replay those layers: the same numbers)."""
    if len(prompts) != len(continuations):
        raise TuError(f"{len(prompts)} prompts but {len(continuations)} continuation lists; give one list per prompt.")
    if any(len(p) == 0 for p in prompts):
        raise TuError("A prompt has zero tokens, so its continuation's first token has no context.")
    pad_id = 0 if pad_id is None else pad_id  # a tokenizer without a pad token: any id works under the attention mask
    if tape is not None and not tape.start(model, ([list(map(int, p)) for p in prompts],
                                                   [[list(map(int, c)) for c in cs] for cs in continuations],
                                                   batch_size, max_tokens_per_chunk, pad_id)):
        tape = None
    taped = (lambda ids: tape.forward(model, ids)) if tape is not None else (lambda ids: contextlib.nullcontext())
    device = next(model.parameters()).device
    out: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.float32) for _ in c] for c in continuations]
    order = sorted((i for i in range(len(prompts)) if any(len(c) for c in continuations[i])), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            ids[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with taped(ids):
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True, logits_to_keep=1)
        prompt_run = (mask, torch.log_softmax(res.logits[:, -1].float(), dim=-1).cpu(), res.past_key_values)
        rows = sorted(((r, j) for r, i in enumerate(batch) for j, c in enumerate(continuations[i]) if len(c)),
                      key=lambda rj: len(continuations[batch[rj[0]]][rj[1]]))
        chunk: list[tuple[int, int]] = []
        for r, j in rows:  # shortest first, so the newest row is the chunk's longest
            if chunk and (len(chunk) + 1) * len(continuations[batch[r]][j]) > max_tokens_per_chunk:
                _score_chunk(model, device, [(batch[r_], j_, r_) for r_, j_ in chunk], continuations, prompt_run, pad_id, out,
                             taped)
                chunk = []
            chunk.append((r, j))
        _score_chunk(model, device, [(batch[r_], j_, r_) for r_, j_ in chunk], continuations, prompt_run, pad_id, out,
                     taped)
    return out


def _score_chunk(model, device, chunk, continuations, prompt_run, pad_id, out, taped) -> None:
    """Run one chunk of continuation rows (prompt i, option j, batch row r) on a copy of their prompts'
    cache and store their per-token log-probs in out[i][j]."""
    mask, first, cache = prompt_run
    src = torch.tensor([r for _, _, r in chunk])
    conts = [list(continuations[i][j]) for i, j, _ in chunk]
    length = max(len(c) for c in conts)
    ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
    cmask = torch.zeros_like(ids)
    for k, c in enumerate(conts):
        ids[k, :len(c)] = torch.tensor(c)
        cmask[k, :len(c)] = 1
    pmask = mask.index_select(0, src)
    pos = pmask.sum(1, keepdim=True) + torch.arange(length)[None, :]
    with taped(ids):
        res = model(input_ids=ids.to(device), attention_mask=torch.cat([pmask, cmask], 1).to(device),
                    position_ids=pos.to(device), past_key_values=_select_cache(cache, src.to(device)), use_cache=True)
    rest = torch.log_softmax(res.logits[:, :-1].float(), dim=-1).cpu().gather(-1, ids[:, 1:, None])[..., 0]
    head = first.index_select(0, src).gather(1, ids[:, :1])  # token 0 is predicted by the prompt's last position
    lp = torch.cat([head, rest], 1)
    for k, (i, j, _) in enumerate(chunk):
        out[i][j] = lp[k, :len(conts[k])].numpy().astype(np.float32)
