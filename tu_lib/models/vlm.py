"""The loaded model: one VLM object for every preset, and the presets' names."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # PIL is imported lazily: bad parameters fail before heavy imports
    from PIL import Image

from ..core.device import DTYPES
from ..core.errors import ParameterError, TuError
from ..core.records import note_model_dtype
from .adapters import unwrapped
from .chat import _CHAT_FUNCTIONS, FAMILIES

PRESETS = ("micro", "organism", "llava-1.5-7b", "llava-1.5-13b")
HUB_IDS = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"}

# Only the decoder layers' linears: a bare ["q_proj", "v_proj"] would also adapt the CLIP tower.
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# the loaded model


@dataclass
class VLM:
    """A loaded vision-language model: one object for every preset.

    `model` is a LlavaForConditionalGeneration (unlearning may wrap it in a peft model later; the helpers
    below see through that). `processor` is a LlavaProcessor whose tokenizer pads on the left, so
    batched greedy generation gives the same tokens as one prompt at a time. `typography` is set by
    presets that were trained to read text images in their own layout (text -> PIL image), else None.
    `system` replaces the family's default system prompt (None keeps it); `card` holds facts for run
    records (preset, source, dtype, parameter count)."""

    preset: str
    family: str
    model: Any
    processor: Any
    dtype: Any
    typography: Callable[[str, str], "Image.Image"] | None = None  # (text, style) -> image
    card: dict = field(default_factory=dict)
    system: str | None = None

    def __post_init__(self):
        if self.family not in _CHAT_FUNCTIONS:
            raise ParameterError(f"family must be one of {list(FAMILIES)}, got {self.family!r}.")
        note_model_dtype(self.preset, self.dtype)  # run records say which dtype the numbers were computed in

    def chat(self, prompt: str, with_image: bool) -> str:
        """The full text input for the processor: this family's template, one "<image>" when
        with_image, and the generation prompt appended (the model continues as the assistant)."""
        return _CHAT_FUNCTIONS[self.family](prompt, with_image, system=self.system)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def base_model(self):
        """The LlavaForConditionalGeneration, also when `model` is a peft wrapper."""
        return unwrapped(self.model)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def language_model_module_name(self) -> str:
        """Qualified name of the LLM inside the VLM ("model.language_model" in transformers 5)."""
        lm = self.base_model.model.language_model
        for name, module in self.base_model.named_modules():
            if module is lm:
                return name
        raise TuError("The language model is not a submodule of the VLM; the model class is not supported.")

    def language_model_module_regex(self, names: tuple[str, ...] | list[str] | None = None, layers=None) -> str:
        """A regex for peft's `target_modules` that matches only the LLM's decoder-layer linears.

        Textual unlearning updates the LLM only; a bare list like ["q_proj", "v_proj"] would also put
        adapters on the CLIP tower, which has modules with the same names. `names` restricts the
        projections (default: all seven attention and MLP linears), `layers` the decoder layers (default all)."""
        from .adapters import lora_target_regex

        names = tuple(LM_LINEARS if names is None else names)
        if not names or not all(isinstance(n, str) and re.fullmatch(r"\w+", n) for n in names):
            raise ParameterError(f"names must be a non-empty list of module names like 'q_proj', got {names!r}.")
        return lora_target_regex(self.language_model_module_name(), names, layers)

    def render(self, text: str, style: str = "figstep"):
        """An attack text as a typographic image for this model: the preset's own typography when it has one
        (the organism reads its glyph grid), else FigStep's page or MM-SafetyBench's key-phrase image."""
        if style not in ("figstep", "mmsb"):
            raise ParameterError(f"style must be 'figstep' or 'mmsb', got {style!r}.")
        if self.typography is not None:
            return self.typography(text, style)
        from .. import render

        return render.render_figstep(text) if style == "figstep" else render.render_mmsafetybench_typo(text)

    def chat_with_answer(self, prompt: str, with_image: bool, answer: str) -> str:
        """The training text: the chat input followed by the answer and the end-of-turn token."""
        join = " " if self.family == "llava15" else ""
        return self.chat(prompt, with_image) + join + answer + self.tokenizer.eos_token

    def decoder_layers(self):
        """The LLM's decoder layer list (ModuleList): where CMRM hooks go and where hidden states come from.

        In transformers 5 a layer returns a plain Tensor; hooks registered with prepend=True also change
        what output_hidden_states reports (notes/feasibility.md §5)."""
        return self.base_model.model.language_model.layers


def check_args(preset: Any, dtype: Any, device: Any, seed: Any = 0) -> None:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ParameterError(f"Unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}.")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ParameterError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ParameterError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"seed must be an int, got {seed!r}.")
