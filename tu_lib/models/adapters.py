"""LoRA adapters on the LLM inside a LLaVA: the target regex, saving, applying and merging them."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..core.errors import TuError


def lora_target_regex(language_model_prefix: str, names, layers) -> str:
    """A peft `target_modules` regex matching only the LLM's decoder-layer linears `names` in `layers`.

    A bare ["q_proj", "v_proj"] would also adapt the CLIP tower, which has modules of the same names;
    textual unlearning updates the LLM only. `layers` None means every layer. The optional prefix lets
    the regex match names inside an already wrapped model too (peft full-matches it)."""
    import re

    layer_re = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
    names = "|".join(re.escape(n) for n in names)
    return rf"(?:.*\.)?{re.escape(language_model_prefix)}\.layers\.{layer_re}\.(?:\w+\.)*(?:{names})"


def unwrapped(model):
    """The transformers model under a peft wrapper (or the model itself): where the decoder layers are reached."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_adapter(peft_model, path, dtype=None) -> None:
    """LoRA weights as safetensors plus peft's adapter_config.json. The organism stores bf16 (half the
    size; its card is measured after reloading them); unlearning keeps fp32 so resumed runs hash equal."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
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

    from ..core.errors import TuError

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


@contextlib.contextmanager
def adapter_applied(vlm, method_dir):
    """Within the block, `vlm.model` carries a method's saved LoRA adapter (unmerged); afterwards the base
    model is restored exactly (peft's unload), so one loaded model serves every method."""
    if hasattr(vlm.model, "peft_config"):  # unload would also strip that adapter, and the two would stack meanwhile
        raise TuError("adapter_applied needs the bare model, but vlm.model already carries a peft adapter: "
                      "unload it first (vlm.model = vlm.model.unload()).")
    peft_model = apply_adapter(vlm.base_model, Path(method_dir) / "adapter").eval()
    vlm.model = peft_model
    try:
        yield vlm
    finally:
        vlm.model = peft_model.unload()
