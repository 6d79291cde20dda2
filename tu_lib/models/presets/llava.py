"""The paper presets (llava-hf/llava-1.5-7b-hf, -13b-hf), loaded from a local copy or the hub, and a tiny random
checkpoint in the same on-disk layout that tests their code path offline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...core.device import quiet_transformers
from ...core.errors import TuError
from ...core.hub import hub_snapshot, local_copy
from ..chat import IMAGE_TOKEN, LLAVA15_HF_CHAT_TEMPLATE
from ..vlm import HUB_IDS, VLM
from .micro import neutral_corpus


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


def _load_llava15(preset: str, torch_dtype, local_dir, device: str) -> VLM:
    """The paper presets: the llava-hf layout, read through the same classes the hub model card uses."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hub_id = HUB_IDS[preset]
    src = local_copy(hub_id, local_dir, _how_to_provide(hub_id))
    from_hub = src is None
    if from_hub:
        src = hub_snapshot(hub_id, _how_to_provide(hub_id))
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
# tiny checkpoint in the llava-hf layout (tests the paper presets' code path offline)


def _llama_style_tokenizer():
    """A small SentencePiece-style BPE ("▁" word marker, <unk>/<s>/</s> = 0/1/2) loaded into
    transformers' LlamaTokenizer, then "<image>" and "<pad>" appended as in llava-hf (32000, 32001)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)  # no cross-word merges
    corpus = neutral_corpus() + ["USER: ASSISTANT: A chat between a curious human and an assistant."] * 5
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

    quiet_transformers()
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


# ---------------------------------------------------------------------------------------------
# the preset interface (models.presets)

WRITES_FORGET_ANSWERS = False  # unlearns PKU-SafeRLHF's unsafe answers (stage 01 with forget_source pku_saferlhf)
NEEDS_ANSWERS = ("The {preset} preset unlearns PKU-SafeRLHF's unsafe answers: rerun stage 01 with "
                 "`-p forget_source pku_saferlhf` (profile paper) so the forget set carries answers.")


def load(preset: str, dtype, device: str, local_dir, seed: int) -> VLM:
    return _load_llava15(preset, dtype, local_dir, device)


def pre_alignment_model(vlm):
    raise TuError(NEEDS_ANSWERS.format(preset=vlm.preset))


def reference_lm(vlm):
    """The base VLM (adapters are only applied inside generation)."""
    return vlm.base_model, vlm.tokenizer, lambda p: vlm.chat(p, False)


def reading_titles(seed: int) -> None:
    return None  # reading utility: LLaVA-Bench-COCO questions on photos from a folder
