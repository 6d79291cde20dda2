"""Representation-gap groundwork (stage 05): hidden states, gap metrics, CMRM hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tu_lib import models as M
from tu_lib import repgap as R
from tu_lib.core import ParameterError
from tu_lib.generate import generate

PROMPTS = ["Describe how a library lends books.", "Explain why the sky looks blue at noon.",
           "List three uses of a garden hose.", "Say how bread rises in an oven."]


@pytest.fixture(scope="module")
def micro():
    return M.load_vlm("micro", dtype="float32")


def _blank(vlm):
    size = vlm.base_model.config.vision_config.image_size
    return Image.new("RGB", (size, size), "white")


def test_cmrm_hook_changes_generation_and_removal_restores_it(micro):
    texts = [micro.chat(p, True) for p in PROMPTS]
    images = [_blank(micro)] * len(texts)
    before = generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
    hidden = micro.base_model.config.text_config.hidden_size
    vec = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) * 5
    with R.cmrm(micro, {1: vec}, alpha=1.0):
        steered = generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
    after = generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
    assert steered != before
    assert after == before
    # alpha 0 is the identity
    with R.cmrm(micro, {1: vec}, alpha=0.0):
        assert generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4) == before


def test_recorded_hidden_states_show_the_correction(micro):
    texts = [micro.chat(p, False) for p in PROMPTS[:2]]
    plain = R.hidden_states(micro, texts, None, [0])
    vec = torch.ones(micro.base_model.config.text_config.hidden_size)
    with R.cmrm(micro, {0: vec}, alpha=0.5):  # layer 0: the last layer's recorded state is after the final norm
        steered = R.hidden_states(micro, texts, None, [0])
    assert np.allclose(steered, plain - 0.5, atol=1e-5)  # prepend=True: the recorded state is the steered one


def test_hidden_states_mixed_batches_keep_input_order(micro):
    texts = [micro.chat(p, i % 2 == 1) for i, p in enumerate(PROMPTS)]
    images = [None if i % 2 == 0 else _blank(micro) for i in range(len(texts))]
    together = R.hidden_states(micro, texts, images, [0, -1], position="mean", batch_size=3)
    alone = np.vstack([R.hidden_states(micro, [t], [im], [0, -1], position="mean") for t, im in zip(texts, images)])
    assert together.shape == (4, 2, micro.base_model.config.text_config.hidden_size)
    assert np.allclose(together, alone, atol=1e-4)


def test_shift_vectors_are_the_mean_image_minus_text_difference(micro):
    chats_img = [micro.chat(p, True) for p in PROMPTS]
    chats_txt = [micro.chat(p, False) for p in PROMPTS]
    v = R.shift_vectors(micro, chats_img, chats_txt, [_blank(micro)] * 4, [1])
    expect = (R.hidden_states(micro, chats_img, [_blank(micro)] * 4, [1]) - R.hidden_states(micro, chats_txt, None, [1])).mean(0)[0]
    assert np.allclose(v[1].numpy(), expect, atol=1e-5)


def test_gap_metrics_tell_separated_from_identical_groups():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    same = R.gap_metrics(a, b)
    apart = R.gap_metrics(a, b + 4.0)
    assert apart["probe_accuracy"] > 0.95 and same["probe_accuracy"] < 0.75
    assert apart["normalised_distance"] > 3 > same["normalised_distance"]
    assert R.direction_cosine(a + 1, a, b + 1, b) > 0.99
    with pytest.raises(ParameterError, match="one width"):
        R.gap_metrics(a, b[:, :4])


def test_bad_layers_and_alphas_are_rejected_before_any_forward(micro):
    n = len(micro.decoder_layers())
    assert R.check_layers(micro, [0, -1]) == [0, n - 1]
    for bad in ([], [n], [-n - 1], ["1"], [True]):
        with pytest.raises(ParameterError):
            R.check_layers(micro, bad)
    assert R.check_alphas([0, 0.5, 1.5]) == [0.0, 0.5, 1.5]
    for bad in ([], [float("nan")], [-0.1], [3.0], ["1"]):
        with pytest.raises(ParameterError):
            R.check_alphas(bad)
    with pytest.raises(ParameterError, match="decoder layer"):
        with R.cmrm(micro, {n + 3: torch.zeros(1)}, alpha=1.0):
            pass
    with pytest.raises(ParameterError, match="position"):
        R.hidden_states(micro, ["x"], None, [0], position="first")


def test_matched_inputs_and_gap_table(micro):
    inputs = R.matched_inputs(micro, PROMPTS)
    assert list(inputs) == list(R.CONDITIONS)
    assert inputs["text"][1] == [None] * 4 and all(im is not None for im in inputs["typographic"][1])
    noise = inputs["noise_image"][1]
    assert not np.array_equal(np.asarray(noise[0]), np.asarray(noise[1]))  # one noise image per prompt
    assert np.array_equal(np.asarray(noise[0]), np.asarray(R.meaningless_image(micro, "noise", 0)))  # seeded
    with pytest.raises(ParameterError, match="blank"):
        R.meaningless_image(micro, "grey")
    states = {c: R.hidden_states(micro, texts, images, [0, 1]) for c, (texts, images) in inputs.items()}
    table = R.gap_table(states, [0, 1])
    assert len(table) == 3 * 2 and set(table["condition"]) == {"typographic", "blank_image", "noise_image"}
    assert (table["normalised_distance"] > 0).all()


def test_alpha_sweep_rows_and_alpha_zero_is_unsteered(micro):
    from tu_lib import evaluate

    inputs = R.matched_inputs(micro, PROMPTS)
    items = [{"key": f"v1|{i}", "set": "v1_figstep", "text": t, "image": im, "prompt": "p", "instruction": PROMPTS[i]}
             for i, (t, im) in enumerate(zip(*inputs["typographic"]))]
    items += [{"key": f"x|{i}", "set": "xstest_safe", "text": t, "image": None, "prompt": p, "instruction": p}
              for i, (t, p) in enumerate(zip(inputs["text"][0], PROMPTS))]
    judges = evaluate.Judges(micro, ["refusal_keywords"])
    vec = torch.randn(micro.base_model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1)) * 5
    table = R.alpha_sweep(micro, items, {0: vec}, [0, 1.0], judges, max_new_tokens=6, batch_size=4)
    assert set(table["alpha"]) == {0.0, 1.0}
    assert set(zip(table["set"], table["metric"])) == {("v1_figstep", "asr"), ("xstest_safe", "over_refusal")}
    assert (table["n"] == 4).all()
    plain = evaluate.metric_rows(micro.preset, "base", judges.judge(items, generate(
        micro.model, micro.processor, [it["text"] for it in items], [it["image"] for it in items], max_new_tokens=6,
        batch_size=4)), judges.provenance(), 0)
    assert table[table["alpha"] == 0]["rate"].tolist() == [r["rate"] for r in plain]
    with pytest.raises(ParameterError):
        R.alpha_sweep(micro, items, {0: vec}, [5.0], judges, max_new_tokens=6, batch_size=4)
