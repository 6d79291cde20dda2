"""One model loader for every preset, so unlearning, evaluation and CMRM share one code path.

Every preset gives the same thing: a `transformers.LlavaForConditionalGeneration` plus a
`LlavaProcessor` (tokenizer + CLIP image processor), wrapped in `VLM` together with the model family's
chat template. Code downstream never asks which preset it runs on.

Presets
  micro          tiny random-init LLaVA built from config in about a second (unit tests); ChatML family.
  organism       the offline model organism (tu_lib.models.presets.organism, imported only when asked for).
  llava-1.5-7b   llava-hf/llava-1.5-7b-hf   (the paper's model, HF port; needs the hub or a local copy)
  llava-1.5-13b  llava-hf/llava-1.5-13b-hf

The hub presets are loaded from a local folder in the llava-hf on-disk layout. Without `local_dir`
the folder is the hub snapshot (downloaded once, or read from the HF cache when offline), so the hub
adds only a download step; `save_tiny_llava15_checkpoint` writes a tiny random model in that same
layout, which is how the paper presets' code path is tested on machines without the hub.

Safety: safetensors only (`use_safetensors=True`), never `trust_remote_code`, never `torch.load`.
transformers 5.x notes (notes/feasibility.md §2): torchvision must not be installed, so the image
processor is `CLIPImageProcessorPil`; `<image>` must be a special token; LlavaProcessor expands each
`<image>` to (H/patch)*(W/patch) + num_additional_image_tokens - 1 tokens ("default" strategy drops CLS).
"""
from __future__ import annotations

import os
from typing import Any

from ..core.device import forced_dtype, quiet_transformers, resolve_device, resolve_dtype
from ..core.errors import ParameterError
from .presets import preset_module
from .vlm import HUB_IDS, VLM, check_args


def load_vlm(preset: str, *, dtype: Any = "auto", local_dir: str | os.PathLike | None = None,
             device: str = "auto", seed: int = 0) -> VLM:
    """Load a preset as a VLM. Arguments are checked before anything heavy is imported or read.
    device 'auto' is the first CUDA GPU when torch sees one, else the CPU (so notebooks need no device parameter).

    local_dir: for the llava presets, a folder in the llava-hf layout (default: $TU_MODEL_DIR/<hub id>
    or $TU_MODEL_DIR/<repo name> if present, else the hub). seed: weights of the random `micro` model.
    dtype "auto" is float32 on a CPU and bf16 (else fp16) on CUDA (resolve_dtype); $TU_FORCE_DTYPE replaces it."""
    check_args(preset, dtype, device, seed)
    dtype = forced_dtype(dtype, preset)
    device = resolve_device(device)
    if local_dir is not None and preset not in HUB_IDS:
        raise ParameterError(f"local_dir is only used by the presets {', '.join(HUB_IDS)}, not by {preset!r}.")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'.")
    quiet_transformers()
    return preset_module(preset).load(preset, resolve_dtype(dtype, device), device, local_dir, seed)
