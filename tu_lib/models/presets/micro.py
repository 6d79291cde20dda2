"""The micro preset: a tiny random-init LLaVA built from config in about a second (unit tests only)."""
from __future__ import annotations

from typing import Any

from ...core.device import quiet_transformers, resolve_device, resolve_dtype
from ...data.titles import benign_titles
from ..chat import CHATML_CHAT_TEMPLATE, IMAGE_TOKEN, SMOLLM2_DEFAULT_SYSTEM
from ..vlm import VLM, check_args

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


def neutral_corpus() -> list[str]:
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
    tok.train_from_iterator(neutral_corpus(), trainers.BpeTrainer(
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

    check_args("micro", dtype, device, seed)
    device = resolve_device(device)
    quiet_transformers()
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
# the preset interface (models.presets)

WRITES_FORGET_ANSWERS = True  # the random model itself answers (code paths only)


def load(preset: str, dtype, device: str, local_dir, seed: int) -> VLM:
    return build_micro(seed=seed, dtype=dtype, device=device)


def pre_alignment_model(vlm):
    return vlm.model, vlm.processor, lambda p: vlm.chat(p, False)


def reference_lm(vlm):
    return vlm.base_model, vlm.tokenizer, lambda p: vlm.chat(p, False)


def reading_titles(seed: int) -> list[str]:
    return benign_titles(seed)[1]
