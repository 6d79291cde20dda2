"""The presets behind models.load_vlm, each a module with the same interface, so code downstream never asks which
preset it runs on:

  load(preset, dtype, device, local_dir, seed) -> VLM      the model (dtype "auto" resolved by the preset)
  WRITES_FORGET_ANSWERS                                    whether its pre-alignment model writes the answers to unlearn
  pre_alignment_model(vlm) -> (model, processor, chat)     the model before safety alignment (its answers are unlearned)
  reference_lm(vlm) -> (model, tokenizer, chat)            a frozen LM that scores answers (never the model under test)
  reading_titles(seed) -> list[str] | None                 the benign titles of the reading utility (None: photos)

micro (tests), llava (the papers' models, two sizes), organism (offline). Modules are imported when first asked for:
importing models stays free of torch.
"""
from __future__ import annotations

import importlib

PRESET_MODULES = {"micro": "micro", "organism": "organism", "llava-1.5-7b": "llava", "llava-1.5-13b": "llava"}


def preset_module(preset: str):
    """The module that implements `preset` (see the interface above)."""
    return importlib.import_module(f".{PRESET_MODULES[preset]}", __name__)


def writes_forget_answers(preset: str) -> bool:
    return preset_module(preset).WRITES_FORGET_ANSWERS


def pre_alignment_model(vlm):
    return preset_module(vlm.preset).pre_alignment_model(vlm)


def reference_lm(vlm):
    return preset_module(vlm.preset).reference_lm(vlm)


def reading_titles(preset: str, seed: int) -> list[str] | None:
    return preset_module(preset).reading_titles(seed)
