"""The proof method (gradient difference), added through the methods registry only: its loss is what its recipe says,
it trains, stops and resumes through the shared loop, and notebook 02's parameters accept it."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from tu_lib import methods, models
from tu_lib.core import write_jsonl
from tu_lib.methods.grad_diff import GRAD_DIFF
from tu_lib.stages import unlearn


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    """Neutral placeholder texts in stage 01's format, and their micro answers."""
    root = tmp_path_factory.mktemp("01_data")
    (root / "sets").mkdir()
    write_jsonl(root / "sets" / "forget.jsonl", [{"prompt": f"Placeholder forget request number {i}?"} for i in range(8)])
    write_jsonl(root / "sets" / "retain.jsonl", [{"prompt": f"What is fact {i}?", "answer": f"Fact {i} follows {i - 1}",
                                                  "correct_answers": f"It is {i}", "incorrect_answers": f"It is {i + 1}"}
                                                 for i in range(8)])
    vlm = models.load_vlm("micro")
    P = {"data_dir": str(root), "n_forget": "all", "answer_tokens": 6, "out_dir": str(tmp_path_factory.mktemp("02")),
         "preset": "micro"}
    return vlm, unlearn.prepare_data(vlm, P)


def cfg(**kw):
    base = dict(method="grad_diff", steps=8, lr=1e-2, batch_size=2, lora_r=4, lora_alpha=8, checkpoint_every=2,
                lora_targets=("q_proj", "v_proj"), lora_first_layer=0)
    base.update(kw)
    return methods.TrainConfig(**base)


def test_registered_with_its_flags():
    assert methods.METHODS["grad_diff"] is GRAD_DIFF
    assert GRAD_DIFF.ascends and not GRAD_DIFF.mismatch and not GRAD_DIFF.images


def test_loss_is_ascent_on_forget_plus_descent_on_normal_plus_the_shared_kl(micro_data):
    vlm, data = micro_data
    c = cfg(ga_weight=0.5, kl_weight=1.0)
    model, _, reference = methods.wrap_model(vlm, c)
    try:
        plan = methods.schedule(c, data)[0]
        rows = methods.step_rows(vlm, GRAD_DIFF, data, plan, methods.ImageCache(vlm))
        assert rows["mismatch"] == [] and len(rows["forget"]) == len(rows["normal"]) == 2
        loss, logged = methods.step_loss(model, reference, GRAD_DIFF, c, vlm, rows)
    finally:
        vlm.model = model.unload()
    assert logged["retain_nll"] == pytest.approx(logged["normal_nll"])
    expected = -0.5 * logged["forget_nll"] + logged["retain_nll"] + 1.0 * logged["kl"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert math.isclose(logged["loss"], float(loss.detach()), rel_tol=1e-6)


def test_training_raises_the_forget_nll_and_keeps_the_normal_nll_down(micro_data, tmp_path):
    vlm, data = micro_data
    summary = methods.train(vlm, data, cfg(), tmp_path / "gd")
    df = pd.read_csv(tmp_path / "gd" / "losses.csv")
    assert summary["steps_done"] == len(df) == 8
    assert df["forget_nll"].iloc[-2:].mean() > df["forget_nll"].iloc[:2].mean() + 0.05, "harmful-answer NLL must rise"
    assert df["retain_nll"].iloc[-2:].mean() < df["forget_nll"].iloc[-2:].mean(), "normal answers stay likelier"
    assert vlm.model is vlm.base_model  # the LoRA layers are gone again


def test_the_stop_rule_applies(micro_data, tmp_path):
    vlm, data = micro_data
    summary = methods.train(vlm, data, cfg(max_forget_nll=1e-3), tmp_path / "stop")
    assert summary["steps_done"] == 1 and "max_forget_nll" in summary["stopped_by"]


def test_notebook_02_accepts_it():
    P = unlearn.resolve_params({"profile": "smoke", "methods": "grad_diff"})
    assert P["methods"] == ["grad_diff"]
