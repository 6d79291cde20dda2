"""Analytic matrix-multiply FLOPs of a training step (stage 04's cost model).

Why analytic: paper A says multimodal unlearning costs "up to 6x" textual unlearning on LLaVA-1.5, which
nobody here can time. Matrix-multiply FLOPs follow from the config and the batch's shape, so the same
formulas give the organism's cost (checked against torch's FLOP counter on a real step, tests/test_cost.py)
and LLaVA-1.5-7B/13B's (576 image tokens per image). Only matrix multiplies are counted (linear layers,
attention, convolutions), exactly what `torch.utils.flop_counter.FlopCounterMode` counts.

A training step of stage 02 is: one forward of the current model over all rows of the step (forget,
mismatch, normal), padded to one width; the LM head on the answer positions only; a backward through the
decoder layers that carry LoRA (none below the first, where nothing needs a gradient); and a forward of the
frozen reference (adapter disabled) on the normal rows for the KL term.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ParameterError

GPUS = {"A100": 312e12, "H100": 989e12}  # dense bf16 peak FLOP/s (SXM data sheets)


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs from a LLaVA-style config."""

    name: str
    layers: int
    hidden: int
    q_dim: int  # attention heads x head dim
    kv_dim: int  # key/value heads x head dim
    intermediate: int
    vocab: int
    v_layers: int
    v_hidden: int
    v_intermediate: int
    v_patches: int  # patches per image (the tower adds a CLS token)
    v_patch_px: int
    image_tokens: int  # LM positions one image takes
    projector_macs: int  # multiply-accumulates of the projector per image token

    @property
    def layer_weights(self) -> int:
        """Weights of one decoder layer's linears (q, k, v, o; gate, up, down)."""
        return 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.intermediate

    @classmethod
    def from_vlm(cls, vlm) -> "Shape":
        model = vlm.base_model
        proj = model.model.multi_modal_projector
        macs = sum(m.in_features * m.out_features for m in proj.modules() if hasattr(m, "in_features"))
        if hasattr(proj, "vocab_embeddings"):  # the organism's glyph projector: softmax x embeddings
            macs += proj.vocab_embeddings.numel()
        return cls._from_config(vlm.preset, model.config, macs)

    @classmethod
    def _from_config(cls, name: str, config, projector_macs: int) -> "Shape":
        t, v = config.text_config, config.vision_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        patches = (v.image_size // v.patch_size) ** 2
        return cls(name=name, layers=t.num_hidden_layers, hidden=t.hidden_size, q_dim=t.num_attention_heads * head_dim,
                   kv_dim=kv_heads * head_dim, intermediate=t.intermediate_size, vocab=t.vocab_size,
                   v_layers=v.num_hidden_layers, v_hidden=v.hidden_size, v_intermediate=v.intermediate_size,
                   v_patches=patches, v_patch_px=v.patch_size,
                   image_tokens=patches if config.vision_feature_select_strategy == "default" else patches + 1,
                   projector_macs=int(projector_macs))


def llava_shape(size: str) -> Shape:
    """LLaVA-1.5-7B / -13B (llava-hf ports): Vicuna-1.5 LM, CLIP ViT-L/14 at 336 px, 2-layer MLP projector.
    Built from the published config values, so no download is needed."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    lm = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
          "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)}
    if size not in lm:
        raise ParameterError(f"Unknown LLaVA-1.5 size {size!r}; choose '7b' or '13b'.")
    text = LlamaConfig(vocab_size=32064, **lm[size])
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_select_strategy="default")
    h = text.hidden_size
    return Shape._from_config(f"llava-1.5-{size}", config, projector_macs=1024 * h + h * h)


@dataclass(frozen=True)
class Batch:
    """One padded forward: rows x width positions, `answer_tokens` positions through the LM head, `images` images."""

    rows: int
    width: int
    answer_tokens: int
    images: int = 0
    text_tokens: int = 0  # real (unpadded) text and image positions: reported, not used by the count
    image_tokens: int = 0


def vision_flops(s: Shape, images: int) -> int:
    """CLIP tower (patch convolution, every layer on patches + CLS) and projector, for `images` images."""
    n = s.v_patches + 1
    conv = 2 * s.v_patches * 3 * s.v_patch_px ** 2 * s.v_hidden
    layer = 2 * n * (4 * s.v_hidden ** 2 + 2 * s.v_hidden * s.v_intermediate) + 4 * n * n * s.v_hidden
    return images * (conv + s.v_layers * layer + 2 * s.image_tokens * s.projector_macs)


def _lora_macs_per_token(s: Shape, r: int, targets) -> int:
    dims = {"q_proj": (s.hidden, s.q_dim), "k_proj": (s.hidden, s.kv_dim), "v_proj": (s.hidden, s.kv_dim),
            "o_proj": (s.q_dim, s.hidden), "gate_proj": (s.hidden, s.intermediate),
            "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}
    return sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def forward_flops(s: Shape, b: Batch, *, lora_layers: int = 0, lora_r: int = 0, lora_targets=()) -> int:
    """One forward: vision tower for the images, every decoder layer at the padded width, the LM head on
    the answer positions, and the LoRA branches of `lora_layers` layers."""
    tokens = b.rows * b.width
    lm = s.layers * (2 * tokens * s.layer_weights + 4 * b.rows * b.width ** 2 * s.q_dim)
    lora = 2 * tokens * lora_layers * _lora_macs_per_token(s, lora_r, lora_targets)
    return vision_flops(s, b.images) + lm + lora + 2 * b.answer_tokens * s.hidden * s.vocab


def backward_flops(s: Shape, b: Batch, *, first_layer: int, lora_r: int, lora_targets) -> int:
    """Backward of a LoRA step: gradients flow from the LM head down to the first LoRA layer only. Frozen
    linears need only their input's gradient (1x their forward), attention 2x, LoRA branches 2x; the first
    LoRA layer's q/k/v need no input gradient (nothing below them trains)."""
    tokens, layers = b.rows * b.width, s.layers - first_layer
    linear = 2 * tokens * (layers * s.layer_weights - (s.hidden * s.q_dim + 2 * s.hidden * s.kv_dim))
    attention = 8 * b.rows * b.width ** 2 * s.q_dim * layers
    lora = 2 * 2 * tokens * layers * _lora_macs_per_token(s, lora_r, lora_targets)
    return linear + attention + lora + 2 * b.answer_tokens * s.hidden * s.vocab


def step_flops(s: Shape, trained: Batch, reference: Batch | None, *, first_layer: int, lora_r: int, lora_targets) -> dict:
    """FLOPs of one unlearning step: forward + backward of the trained batch, forward of the KL reference batch."""
    lora = dict(lora_r=lora_r, lora_targets=tuple(lora_targets))
    fwd = forward_flops(s, trained, lora_layers=s.layers - first_layer, **lora)
    bwd = backward_flops(s, trained, first_layer=first_layer, **lora)
    ref = forward_flops(s, reference) if reference is not None else 0
    return {"forward": fwd, "backward": bwd, "reference": ref, "total": fwd + bwd + ref}
