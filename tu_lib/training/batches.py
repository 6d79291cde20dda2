"""Answer-only batches and losses shared by the organism build (stage 00), unlearning (stage 02) and the cost
stage. The loss heads are applied to the answer positions only: on a CPU, a 49k-way LM head over every
prompt position costs as much as the decoder layers (a LoRA step went from ~38 s to ~3.9 s with this).
"""
from __future__ import annotations

import torch

from ..models.adapters import unwrapped


def encode_batch(tok, processor, rows: list[tuple[str, str, object]]) -> dict:
    """Right-padded training batch from (prompt text, prompt + answer text, image or None) rows, with
    labels on the answer tokens only (prompt and padding are -100). Texts are fully formatted (chat
    template applied); rows with an image go through the processor, which expands the placeholder."""
    ids, labels, pixels = [], [], []
    for prompt, full, image in rows:
        if image is not None:
            p_ids = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0]
            enc = processor(text=[full], images=[image], return_tensors="pt")
            pixels.append(enc["pixel_values"][0])
            f_ids = enc["input_ids"][0]
        else:
            p_ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            f_ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        lab = f_ids.clone()
        lab[: len(p_ids)] = -100
        ids.append(f_ids)
        labels.append(lab)
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    batch = {
        "input_ids": torch.stack([torch.cat([x, torch.full((width - len(x),), pad)]) for x in ids]),
        "labels": torch.stack([torch.cat([x, torch.full((width - len(x),), -100)]) for x in labels]),
        "attention_mask": torch.stack([torch.cat([torch.ones(len(x), dtype=torch.long), torch.zeros(width - len(x), dtype=torch.long)]) for x in ids]),
    }
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def answer_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, row index) at the answer positions only, for any causal LM or LLaVA (peft-wrapped
    or not): one forward through the decoder, then the LM head on the positions that carry a label."""
    inner = unwrapped(model)
    param = next(inner.parameters())
    batch = {k: v.to(param.device) for k, v in batch.items()}  # batches are built on the CPU; GPU presets need them moved
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    hidden = inner.model(**inputs).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    return inner.lm_head(hidden[keep]).float(), targets[keep], rows


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy over all answer tokens of the batch."""
    logits, targets, _ = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, targets)


def per_row_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of per-token values within each row (rows without answer tokens give 0)."""
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    count = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)


def encode_rows(vlm, rows: list[tuple]) -> dict:

    return encode_batch(vlm.tokenizer, vlm.processor,
                        [(vlm.chat(p, image is not None), vlm.chat_with_answer(p, image is not None, a), image)
                         for p, image, a in rows])


# ---------------------------------------------------------------------------------------------
# losses


def token_nll(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(reference || current) of the next-token distributions (Yao et al.'s
    utility term: the frozen model's distribution is the target, so the current model is kept where it was)."""
    cur = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(reference_logits, -1)
    return (ref.exp() * (ref - cur)).sum(-1).mean()
