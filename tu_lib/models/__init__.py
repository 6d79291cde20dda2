"""One model interface for every preset: the VLM, its chat templates, loading, adapters, generation and
likelihood scoring; presets/ holds micro, llava and the organism.
"""
from __future__ import annotations

from ..core.device import FORCE_DTYPE_ENV, cpu_has_fast_bf16, default_dtype, resolve_dtype
from .adapters import adapter_applied, apply_adapter, lora_target_regex, merge_adapter, save_adapter
from .chat import (
    CHATML_CHAT_TEMPLATE,
    FAMILIES,
    IMAGE_TOKEN,
    LLAVA15_HF_CHAT_TEMPLATE,
    SMOLLM2_DEFAULT_SYSTEM,
    chat_chatml,
    chat_llava15,
)
from .loading import load_vlm
from .presets.llava import save_tiny_llava15_checkpoint
from .presets.micro import build_micro
from .vlm import HUB_IDS, LM_LINEARS, PRESETS, VLM, check_args
