"""Analytic FLOPs of an unlearning step agree with torch's FLOP counter on the organism (issue: within 10%)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tu_lib import cost as C
from tu_lib import models as M
from tu_lib import unlearn as U
from tu_lib.core import ParameterError
from tu_lib.render import FIGSTEP_TEXT_PROMPT

# neutral stand-ins for forget / mismatch / normal rows: the count depends on shapes, not on content
PROMPTS = ["Describe how a library lends books.", "Explain why the sky looks blue at noon.",
           "List three uses of a garden hose.", "Say how bread rises in an oven."]
ANSWERS = ["Readers borrow books with a card and return them later.", "Air scatters blue light more than red light.",
           "Watering plants, washing a car and filling a pool.", "Yeast makes gas that lifts the dough while it bakes."]


@pytest.fixture(scope="module")
def organism(one_torch_thread):
    try:
        return M.load_vlm("organism", dtype="float32")
    except Exception as e:  # the backbone comes from a PyPI package; without it there is nothing to count
        pytest.skip(f"organism unavailable: {e}")


def _rows(vlm, images: bool, objective: str) -> dict:
    forget = [(FIGSTEP_TEXT_PROMPT, vlm.render(p, "figstep"), a) if images else (p, None, a)
              for p, a in zip(PROMPTS, ANSWERS)]
    mismatch = [(p, im, ANSWERS[(i + 1) % 4]) for i, (p, im, _) in enumerate(forget)] if objective == "ga" else []
    return {"forget": forget, "mismatch": mismatch, "normal": [(p, None, a) for p, a in zip(PROMPTS[::-1], ANSWERS[::-1])]}


def _batch(vlm, rows) -> C.Batch:
    b = U.encode_rows(vlm, rows)
    return C.Batch(rows=b["input_ids"].shape[0], width=b["input_ids"].shape[1],
                   answer_tokens=int((b["labels"][:, 1:] != -100).sum()), images=len(b.get("pixel_values", [])))


@pytest.mark.parametrize("method", ["textual_ga", "multimodal_ga", "mm_sft"])
def test_analytic_step_flops_match_torch_counter(organism, method):
    vlm, m = organism, U.METHODS[method]
    cfg = U.TrainConfig(method=method, steps=1, lr=1e-4, batch_size=4, lora_first_layer=15)
    rows = _rows(vlm, m.images, m.objective)
    trained = _batch(vlm, [r for k in ("forget", "mismatch", "normal") for r in rows[k]])
    analytic = C.step_flops(C.Shape.from_vlm(vlm), trained, _batch(vlm, rows["normal"]), first_layer=15,
                            lora_r=cfg.lora_r, lora_targets=cfg.lora_targets)
    model, _, reference = U.wrap_model(vlm, cfg)
    try:
        with FlopCounterMode(display=False) as counter:
            loss, _ = U.step_loss(model, reference, m, cfg, vlm, rows)
            loss.backward()
    finally:
        vlm.model = model.unload()
    counted = counter.get_total_flops()
    assert abs(analytic["total"] / counted - 1) < 0.10, (analytic, counted)
    assert analytic["backward"] > 0 and analytic["reference"] > 0
    assert (trained.images > 0) == m.images


def test_llava_shapes_from_published_configs():
    s7, s13 = C.llava_shape("7b"), C.llava_shape("13b")
    assert (s7.layers, s7.hidden, s7.image_tokens, s7.v_patches) == (32, 4096, 576, 576)
    assert (s13.layers, s13.hidden) == (40, 5120)
    # ~2 FLOPs per weight per token: a 7B LM forward on one token costs ~13 GFLOP (LM head included)
    per_token = C.forward_flops(s7, C.Batch(rows=1, width=1, answer_tokens=1)) / 1e9
    assert 12 < per_token < 14.5
    with pytest.raises(ParameterError, match="7b"):
        C.llava_shape("70b")


def test_images_make_the_step_dearer():
    s = C.llava_shape("7b")
    text = C.step_flops(s, C.Batch(12, 120, 240), C.Batch(4, 100, 60), first_layer=0, lora_r=32, lora_targets=["q_proj", "v_proj"])
    image = C.step_flops(s, C.Batch(12, 120 + 576, 240, images=8), C.Batch(4, 100, 60), first_layer=0, lora_r=32,
                         lora_targets=["q_proj", "v_proj"])
    assert image["total"] / text["total"] > 4
