"""Shared training pieces: answer-only batches and losses, LoRA on the LLM inside a LLaVA, seeding.

Used by the organism build (stage 00) and by unlearning (stage 02). The loss heads are applied to the
answer positions only: on a CPU, a 49k-way LM head over every prompt position costs as much as the
decoder layers (a LoRA step went from ~38 s to ~3.9 s with this)."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast():
    """The organism build's training precision: bf16 autocast where the CPU has fast bf16 matmuls (AMX /
    AVX512-BF16), else plain fp32 (on an AVX2-only CPU bf16 is emulated and ~50x slower than fp32). This is
    the one place that depends on the CPU: it is how the committed parts were built, and it only runs when the
    parts are rebuilt (`make organism`, checked against the card's CIs by `make organism-check`). Models are
    loaded and evaluated in float32 on any CPU (models.resolve_dtype)."""
    from .models import cpu_has_fast_bf16

    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_has_fast_bf16() else contextlib.nullcontext()


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


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, row index) at the answer positions only, for any causal LM or LLaVA (peft-wrapped
    or not): one forward through the decoder, then the LM head on the positions that carry a label."""
    inner = _inner(model)
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


def lora_target_regex(language_model_prefix: str, names, layers) -> str:
    """A peft `target_modules` regex matching only the LLM's decoder-layer linears `names` in `layers`.

    A bare ["q_proj", "v_proj"] would also adapt the CLIP tower, which has modules of the same names;
    textual unlearning updates the LLM only. `layers` None means every layer. The optional prefix lets
    the regex match names inside an already wrapped model too (peft full-matches it)."""
    import re

    layer_re = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
    names = "|".join(re.escape(n) for n in names)
    return rf"(?:.*\.)?{re.escape(language_model_prefix)}\.layers\.{layer_re}\.(?:\w+\.)*(?:{names})"


def save_adapter(peft_model, path, dtype=torch.bfloat16) -> None:
    """LoRA weights as safetensors plus peft's adapter_config.json. The organism stores bf16 (half the
    size; its card is measured after reloading them); unlearning keeps fp32 so resumed runs hash equal."""
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(path / "adapter_model.safetensors"))
    config = peft_model.peft_config["default"]
    name, config.base_model_name_or_path = config.base_model_name_or_path, None  # a machine-specific cache path
    config.save_pretrained(str(path))
    config.base_model_name_or_path = name


def apply_adapter(model, path):
    """Wrap `model` with a saved LoRA adapter (a peft model; `merge_adapter` merges it)."""
    import warnings
    from pathlib import Path

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from .core import TuError

    path = Path(path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise TuError(f"No LoRA adapter in {path} ({name} missing); train it first (notebook 02).")
    config = weights = None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            if name.endswith(".json"):
                config = LoraConfig.from_pretrained(str(path))
            else:
                weights = load_file(str(path / name))
        except Exception as e:  # safetensors' and peft's own errors name neither the file nor what to do
            raise TuError(f"{path / name} cannot be read ({type(e).__name__}: {e}): the file is damaged or incomplete. "
                          "Train it again (notebook 02 retrains a damaged method; `make organism` rebuilds the "
                          "organism's parts).") from e
    config.base_model_name_or_path = getattr(model.config, "_name_or_path", None)  # the cache folder differs per machine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        peft_model = get_peft_model(model, config)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in weights.items()}
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise TuError(f"adapter {path} does not fit the model: unexpected keys {result.unexpected_keys[:3]}")
    return peft_model


def merge_adapter(model, path):
    """Apply a saved LoRA adapter and merge it into the weights (returns the plain model)."""
    return apply_adapter(model, path).merge_and_unload()
