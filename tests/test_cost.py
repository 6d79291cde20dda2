"""Analytic FLOPs of an unlearning step agree with torch's FLOP counter on the organism (issue: within 10%)."""
from __future__ import annotations

import pytest

from tu_lib import analysis
from tu_lib import methods as U
from tu_lib import models as M
from tu_lib.core import ParameterError, TuError
from tu_lib.render.pages import FIGSTEP_TEXT_PROMPT
from tu_lib.stages import cost as C

# neutral stand-ins for forget / mismatch / normal rows: the count depends on shapes, not on content
PROMPTS = ["Describe how a library lends books.", "Explain why the sky looks blue at noon.",
           "List three uses of a garden hose.", "Say how bread rises in an oven."]
ANSWERS = ["Readers borrow books with a card and return them later.", "Air scatters blue light more than red light.",
           "Watering plants, washing a car and filling a pool.", "Yeast makes gas that lifts the dough while it bakes."]


@pytest.fixture(scope="module")
def organism(one_torch_thread):
    try:
        return M.load_vlm("organism")  # as notebook 04 loads it (dtype auto: float32 on a CPU)
    except TuError as e:  # the backbone comes from a PyPI package; without it there is nothing to count
        pytest.skip(f"organism unavailable: {e}")


def _rows(vlm, images: bool, mismatch: bool) -> dict:
    forget = [(FIGSTEP_TEXT_PROMPT, vlm.render(p, "figstep"), a) if images else (p, None, a)
              for p, a in zip(PROMPTS, ANSWERS)]
    mismatch = [(p, im, ANSWERS[(i + 1) % 4]) for i, (p, im, _) in enumerate(forget)] if mismatch else []
    return {"forget": forget, "mismatch": mismatch, "normal": [(p, None, a) for p, a in zip(PROMPTS[::-1], ANSWERS[::-1])]}


@pytest.mark.parametrize("method", ["textual_ga", "multimodal_ga", "mm_sft"])
def test_analytic_step_flops_match_torch_counter(organism, method):
    m = U.METHODS[method]
    cfg = U.TrainConfig(method=method, steps=1, lr=1e-4, batch_size=4, lora_r=16, lora_alpha=32, lora_first_layer=15,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                        checkpoint_every=10)
    found = C.count_step(organism, cfg, _rows(organism, m.images, m.mismatch))
    assert abs(found["analytic_over_counted"] - 1) < 0.10, found
    assert found["backward"] > 0 and found["reference"] > 0
    trained, _ = C.step_batches(organism, _rows(organism, m.images, m.mismatch))
    assert (trained.images > 0) == m.images and (trained.image_tokens > 0) == m.images
    assert organism.model is organism.base_model  # the LoRA layers are gone again


def test_llava_shapes_from_published_configs():
    s7, s13 = analysis.llava_shape("7b"), analysis.llava_shape("13b")
    assert (s7.layers, s7.hidden, s7.image_tokens, s7.v_patches) == (32, 4096, 576, 576)
    assert (s13.layers, s13.hidden) == (40, 5120)
    # ~2 FLOPs per weight per token: a 7B LM forward on one token costs ~13 GFLOP (LM head included)
    per_token = analysis.forward_flops(s7, analysis.Batch(rows=1, width=1, answer_tokens=1)) / 1e9
    assert 12 < per_token < 14.5
    with pytest.raises(ParameterError, match="7b"):
        analysis.llava_shape("70b")


def test_images_make_the_step_dearer():
    s = analysis.llava_shape("7b")
    text = analysis.step_flops(s, analysis.Batch(12, 120, 240), analysis.Batch(4, 100, 60), first_layer=0, lora_r=32, lora_targets=["q_proj", "v_proj"])
    image = analysis.step_flops(s, analysis.Batch(12, 120 + 576, 240, images=8), analysis.Batch(4, 100, 60), first_layer=0, lora_r=32,
                         lora_targets=["q_proj", "v_proj"])
    assert image["total"] / text["total"] > 4


def test_bad_parameters_stop_before_any_work(tmp_path):
    with pytest.raises(ParameterError, match="unknown method"):
        C.resolve_params({"profile": "smoke", "methods": "textual_ga,nope"})
    with pytest.raises(ParameterError, match="steps"):
        C.resolve_params({"profile": "smoke", "steps": 0})
    with pytest.raises(ParameterError, match="gpu_utilisation"):
        C.resolve_params({"profile": "smoke", "gpu_utilisation": 1.5})
    with pytest.raises(ParameterError, match="Unknown model preset 'llava-2'"):
        C.resolve_params({"profile": "smoke", "preset": "llava-2"})
    with pytest.raises(ParameterError, match="model_dir"):
        C.resolve_params({"profile": "paper", "model_dir": str(tmp_path / "missing")})
    P, P02 = C.resolve_params({"profile": "smoke"})
    assert P02["preset"] == "organism" and P["methods"] == ["textual_ga", "multimodal_ga"]
    assert P02["out_dir"] == "runs/smoke/02_unlearn" and P02["model_dir"] == ""
    # a 13B run from a local checkpoint, its stage 02 outputs elsewhere: the timed steps use that model and folder
    _, P02 = C.resolve_params({"profile": "paper", "preset": "llava-1.5-13b", "model_dir": str(tmp_path),
                               "unlearn_dir": "runs/paper13/02_unlearn"})
    assert (P02["preset"], P02["model_dir"], P02["out_dir"]) == ("llava-1.5-13b", str(tmp_path), "runs/paper13/02_unlearn")
    with pytest.raises(TuError, match="run stage 02"):
        C.stage02_runs(tmp_path, ["textual_ga"])


def test_ratio_curve_falls_with_text_and_rises_with_image_tokens():
    paper02 = U.resolve_params({"profile": "paper"})
    curve = C.ratio_curve(paper02).pivot(index="text_tokens", columns="image_tokens", values="ratio")
    assert (curve > 1).all().all()
    assert (curve.diff().dropna() < 0).all().all()          # more text per row: images matter less
    assert (curve.T.diff().dropna() > 0).all().all()        # bigger images: dearer steps


def test_summary_per_method_reads_gpu_memory_only_when_measured_on_a_gpu():
    import pandas as pd

    rows = [{"method": m, "seconds": s, "text_tokens": 10, "image_tokens": i, "padded_positions": 40, "gflop": 2.0,
             "peak_rss_mb": r} for m, s, i, r in [("a", 1.0, 0, 100), ("a", 3.0, 0, 120), ("a", 2.0, 0, 110), ("b", 4.0, 576, 90)]]
    cpu = C.summarise(pd.DataFrame(rows))
    assert list(cpu["method"]) == ["a", "b"] and "peak_gpu_mb" not in cpu
    a = cpu.iloc[0]
    assert (a["steps_timed"], a["seconds_median"], a["seconds_min"], a["seconds_max"], a["peak_rss_mb"]) == (3, 2.0, 1.0, 3.0, 120)
    assert a["achieved_gflops"] == pytest.approx(1.0)
    gpu = C.summarise(pd.DataFrame([{**r, "peak_gpu_mb": g} for r, g in zip(rows, [500, 700, 600, 900])]))
    assert list(gpu["peak_gpu_mb"]) == [700, 900]


def test_run_record_hashes_stage02_runs_and_stage03_results(tmp_path):
    from tu_lib.core import sha256_file

    for m in ("textual_ga", "multimodal_ga"):
        (tmp_path / "u" / m).mkdir(parents=True)
        (tmp_path / "u" / m / "summary.json").write_text("{}")
        (tmp_path / "u" / m / "losses.csv").write_text(f"step\n{m}\n")
    P = {"methods": ["textual_ga", "multimodal_ga"], "eval_dir": str(tmp_path / "e")}
    P02 = {"out_dir": str(tmp_path / "u")}
    assert len(C.input_hashes(P, P02)) == 4  # no stage 03 results yet: not listed
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.csv").write_text("method\n")
    hashes = C.input_hashes(P, P02)
    assert hashes[str(tmp_path / "e" / "results.csv")] == sha256_file(tmp_path / "e" / "results.csv")
    assert hashes[str(tmp_path / "u" / "textual_ga" / "losses.csv")] != hashes[str(tmp_path / "u" / "multimodal_ga" / "losses.csv")]
