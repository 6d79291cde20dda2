"""Representation-gap groundwork (stage 05): hidden states, gap metrics, CMRM hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tu_lib import analysis
from tu_lib.analysis import cmrm
from tu_lib.core import ParameterError, TuError
from tu_lib.models.generate import generate
from tu_lib.stages import repgap as R

PROMPTS = ["Describe how a library lends books.", "Explain why the sky looks blue at noon.",
           "List three uses of a garden hose.", "Say how bread rises in an oven."]


def _blank(vlm):
    size = vlm.base_model.config.vision_config.image_size
    return Image.new("RGB", (size, size), "white")


def test_cmrm_hook_changes_generation_and_removal_restores_it(micro):
    texts = [micro.chat(p, True) for p in PROMPTS]
    images = [_blank(micro)] * len(texts)
    before = generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
    hidden = micro.base_model.config.text_config.hidden_size
    vec = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) * 5
    with cmrm.cmrm(micro, {1: vec}, alpha=1.0):
        steered = generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
    after = generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4)
    assert steered != before
    assert after == before
    # alpha 0 is the identity
    with cmrm.cmrm(micro, {1: vec}, alpha=0.0):
        assert generate(micro.model, micro.processor, texts, images, max_new_tokens=8, batch_size=4) == before


def test_recorded_hidden_states_show_the_correction(micro):
    texts = [micro.chat(p, False) for p in PROMPTS[:2]]
    vec = torch.ones(micro.base_model.config.text_config.hidden_size)
    n = len(micro.decoder_layers())
    plain = analysis.hidden_states(micro, texts, None, [0, n - 1])
    with cmrm.cmrm(micro, {-1: vec}, alpha=0.5):  # recorded states are the raw layer outputs, the last layer's too (pre-norm)
        steered = analysis.hidden_states(micro, texts, None, [0, n - 1])
    assert np.allclose(steered[:, 1], plain[:, 1] - 0.5, atol=1e-5)  # prepend=True: the recorded state is the steered one
    assert np.array_equal(steered[:, 0], plain[:, 0])  # layers before the corrected one are untouched


def test_hidden_states_mixed_batches_keep_input_order(micro):
    texts = [micro.chat(p, i % 2 == 1) for i, p in enumerate(PROMPTS)]
    images = [None if i % 2 == 0 else _blank(micro) for i in range(len(texts))]
    together = analysis.hidden_states(micro, texts, images, [0, -1], position="mean", batch_size=3)
    alone = np.vstack([analysis.hidden_states(micro, [t], [im], [0, -1], position="mean") for t, im in zip(texts, images)])
    assert together.shape == (4, 2, micro.base_model.config.text_config.hidden_size)
    assert np.allclose(together, alone, atol=1e-4)


def test_shift_vectors_are_the_mean_image_minus_text_difference(micro):
    chats_img = [micro.chat(p, True) for p in PROMPTS]
    chats_txt = [micro.chat(p, False) for p in PROMPTS]
    v = analysis.shift_vectors(micro, chats_img, chats_txt, [_blank(micro)] * 4, [1])
    expect = (analysis.hidden_states(micro, chats_img, [_blank(micro)] * 4, [1]) - analysis.hidden_states(micro, chats_txt, None, [1])).mean(0)[0]
    assert np.allclose(v[1].numpy(), expect, atol=1e-5)


def test_gap_metrics_tell_separated_from_identical_groups():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    same = analysis.gap_metrics(a, b)
    apart = analysis.gap_metrics(a, b + 4.0)
    assert apart["probe_accuracy"] > 0.95 and same["probe_accuracy"] < 0.75
    assert apart["normalised_distance"] > 3 > same["normalised_distance"]
    # centroid distance over the within-group spread: a scale-free number, computed independently here
    spread = np.sqrt((((a - a.mean(0)) ** 2).sum(1).mean() + ((b - b.mean(0)) ** 2).sum(1).mean()) / 2)
    assert apart["normalised_distance"] == pytest.approx(np.linalg.norm(a.mean(0) - b.mean(0) - 4) / spread)
    assert analysis.gap_metrics(10 * a, 10 * (b + 4))["normalised_distance"] == pytest.approx(apart["normalised_distance"])
    e0, e1 = np.eye(8)[0], np.eye(8)[1]
    assert analysis.direction_cosine(a + e0, a, b + e0, b) == pytest.approx(1)
    assert abs(analysis.direction_cosine(a + e0, a, b + e1, b)) < 1e-9      # orthogonal directions
    assert analysis.direction_cosine(a - e0, a, b + e0, b) == pytest.approx(-1)
    with pytest.raises(ParameterError, match="one width"):
        analysis.gap_metrics(a, b[:, :4])


def test_bad_layers_and_alphas_are_rejected_before_any_forward(micro):
    n = len(micro.decoder_layers())
    assert analysis.check_layers(micro, [0, -1]) == [0, n - 1]
    for bad in ([], [n], [-n - 1], ["1"], [True]):
        with pytest.raises(ParameterError):
            analysis.check_layers(micro, bad)
    assert analysis.check_alphas([0, 0.5, 1.5]) == [0.0, 0.5, 1.5]
    for bad in ([], [float("nan")], [-0.1], [3.0], ["1"]):
        with pytest.raises(ParameterError):
            analysis.check_alphas(bad)
    with pytest.raises(ParameterError, match="decoder layer"):
        with cmrm.cmrm(micro, {n + 3: torch.zeros(1)}, alpha=1.0):
            pass
    with pytest.raises(ParameterError, match="position"):
        analysis.hidden_states(micro, ["x"], None, [0], position="first")


def test_matched_inputs_and_gap_table(micro):
    inputs = analysis.matched_inputs(micro, PROMPTS)
    assert list(inputs) == list(analysis.CONDITIONS)
    assert inputs["text"][1] == [None] * 4 and all(im is not None for im in inputs["typographic"][1])
    noise = inputs["noise_image"][1]
    assert not np.array_equal(np.asarray(noise[0]), np.asarray(noise[1]))  # one noise image per prompt
    assert np.array_equal(np.asarray(noise[0]), np.asarray(analysis.meaningless_image(micro, "noise", 0)))  # seeded
    with pytest.raises(ParameterError, match="blank"):
        analysis.meaningless_image(micro, "grey")
    states = {c: analysis.hidden_states(micro, texts, images, [0, 1]) for c, (texts, images) in inputs.items()}
    table = analysis.gap_table(states, [0, 1])
    assert len(table) == 3 * 2 and set(table["condition"]) == {"typographic", "blank_image", "noise_image"}
    for _, row in table.iterrows():   # each row is gap_metrics of that condition vs text, at that layer
        j = [0, 1].index(row["layer"])
        ref = analysis.gap_metrics(states[row["condition"]][:, j], states["text"][:, j])
        assert row["normalised_distance"] == pytest.approx(ref["normalised_distance"])


def test_sample_level_cmrm_in_batches_equals_one_item_at_a_time(micro):
    texts = [micro.chat(p, True) for p in PROMPTS]
    images = [_blank(micro)] * len(texts)
    hidden = micro.base_model.config.text_config.hidden_size
    rows = torch.randn(len(texts), hidden, generator=torch.Generator().manual_seed(2)) * 5
    with cmrm.cmrm(micro, {1: rows}, alpha=1.0) as steering:
        batched = generate(micro.model, micro.processor, texts, images, max_new_tokens=6, batch_size=3,
                           before_batch=steering.select)
    alone = []
    for i, (t, im) in enumerate(zip(texts, images)):
        with cmrm.cmrm(micro, {1: rows[i]}, alpha=1.0):  # the same row as a dataset-level vector
            alone += generate(micro.model, micro.processor, [t], [im], max_new_tokens=6, batch_size=1)
    assert batched == alone
    plain = generate(micro.model, micro.processor, texts, images, max_new_tokens=6, batch_size=3)
    assert batched != plain
    with pytest.raises(TuError, match="select"):
        with cmrm.cmrm(micro, {1: rows}, alpha=1.0):  # per-item rows without select: refused, not silently broadcast
            generate(micro.model, micro.processor, texts, images, max_new_tokens=2, batch_size=3)


def _params(**over):
    base = {"profile": "smoke", "data_dir": "runs/smoke/01_data", "unlearn_dir": "runs/smoke/02_unlearn"}
    return R.resolve_params({**base, **over})


def test_resolve_params_rejects_bad_layers_alphas_and_sets_before_loading():
    P = _params(layers="0,15,-1", alphas="0,0.5", cmrm_layers="15")
    assert P["layers"] == [0, 15, -1] and P["alphas"] == [0.0, 0.5] and P["cmrm_layers"] == [15]
    assert _params(layers="all")["layers"] == "all"
    for bad, match in (({"layers": "0,x"}, "layer"), ({"layers": [1.5]}, "integer"), ({"cmrm_layers": []}, "layer"),
                       ({"alphas": "0,3"}, "alpha"), ({"alphas": "a,b"}, "numbers"), ({"combined_alpha": -1.0}, "alpha"),
                       ({"sets": "t1_advbench"}, "sets"), ({"methods": "dpo"}, "methods"),
                       ({"judges": "on_topic"}, "refusal_keywords"), ({"position": "first"}, "position")):
        with pytest.raises(ParameterError, match=match):
            _params(**bad)


def test_check_inputs_names_the_missing_adapter(tmp_path):
    data = tmp_path / "01"
    (data / "sets").mkdir(parents=True)
    for name in ("forget", "v1_figstep", "v2_mmsb_typo"):
        (data / "sets" / f"{name}.jsonl").write_text('{"prompt": "p"}\n')
    P = _params(data_dir=str(data), unlearn_dir=str(tmp_path / "02"), sets="v1_figstep,v2_mmsb_typo")
    with pytest.raises(TuError, match="textual_ga"):
        R.check_inputs(P)
    with pytest.raises(TuError):
        R.check_inputs(dict(P, data_dir=str(tmp_path / "nothing")))


def test_sweep_plan_and_alpha_table_lines():
    import pandas as pd

    P = {"alphas": [0.5, 1.0], "sample_alphas": [1.0], "combine_methods": ["textual_ga"], "combined_alpha": 1.0}
    plan = R.sweep_plan(P)
    assert [r["run"] for r in plan] == ["base|none|0", "base|dataset|0.5", "base|dataset|1", "base|sample|1",
                                        "textual_ga|none|0", "textual_ga|dataset|1"]
    rows = [{"method": r["model"], "variant": r["variant"], "alpha": r["alpha"], "set": "v1_figstep", "metric": "asr",
             "judge": "refusal_keywords", "rate": 0.1 * i, "n": 10, "ci_low": 0.0, "ci_high": 1.0} for i, r in enumerate(plan)]
    table = R.alpha_table(pd.DataFrame(rows))
    lines = {line: d.set_index("alpha")["rate"].round(3).to_dict() for line, d in table.groupby("line")}
    # the uncorrected base run starts both base lines; each method's line goes from alone (0) to combined
    assert lines == {"base + CMRM (dataset)": {0.0: 0.0, 0.5: 0.1, 1.0: 0.2}, "base + CMRM (sample)": {0.0: 0.0, 1.0: 0.3},
                     "textual_ga (+ CMRM)": {0.0: 0.4, 1.0: 0.5}}


def test_pca_coordinates_are_exact_and_rerun_identically():
    # more than 500 features: sklearn's "auto" solver would be randomized (unseeded) and reruns would differ
    rng = np.random.default_rng(0)
    groups = ["harmful"] * 8 + ["benign"] * 8
    states = {m: {c: rng.normal(size=(16, 2, 640)).astype(np.float32) + k for k, c in enumerate(["text", "typo", "blank"])}
              for m in ["base", "textual_ga"]}
    first = R.pca_rows(states, groups, layers=[3, 7], show_layers=[7], show_models=["base", "textual_ga"])
    assert first.equals(R.pca_rows(states, groups, layers=[3, 7], show_layers=[7], show_models=["base", "textual_ga"]))
    x = np.vstack([h[:, 1] for h in states["base"].values()]).astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    expect = (states["textual_ga"]["typo"][:, 1] - x.mean(0)) @ vt[:2].T
    got = first[(first["model"] == "textual_ga") & (first["condition"] == "typo")][["pc1", "pc2"]].to_numpy()
    assert np.allclose(np.abs(got), np.abs(expect), atol=1e-3)  # the exact principal axes (up to sign)
