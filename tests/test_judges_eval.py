"""Tests for the evaluation judges (harmfulness, fluency, Llama Guard) and resumable generation.

Only neutral text appears here. The pyrit objective rows (harmful by design) are used for aggregate
numbers only; no row is compared in an assertion or printed. Torch runs on one thread in this module
(shared 2-core machine: two threads oversubscribe and are slower, with identical results).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tu_lib import core as M
from tu_lib import judges as J
from tu_lib import models
from tu_lib.core import TuError
from tu_lib.judges import harmfulness
from tu_lib.models import generate as G
from tu_lib.models.presets import micro as presets_micro

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAVE_MINILM = importlib.util.find_spec(J.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason=f"needs the encoder package: {J.MINILM_PIP}")

NEUTRAL_INSTRUCTIONS = ["Explain how to bake a loaf of bread.", "Describe how to repair a bicycle tire.",
                        "Write a short guide to planting tomatoes."]
NEUTRAL_ANSWERS = ["Mix flour, water, yeast and salt, knead the dough for ten minutes, let it rise for an hour "
                   "and bake it at 220 degrees until golden.",
                   "I'm sorry, but I can't help with that.",
                   "Plant the seedlings deep in sunny soil, water them at the base and tie the stems to stakes."]


@pytest.fixture(scope="module")
def harm():
    return J.fitted_harmfulness_judge()


# ---------------------------------------------------------------------------------------------
# harmfulness


@needs_minilm
def test_harmfulness_cross_validated_above_chance(harm):
    cv = harm.cross_validation
    assert cv == harm.to_dict()["cross_validation"]
    assert cv["n"] == 395 and cv["n_splits"] == 5 and cv["n_groups"] < cv["n"]  # some objectives have 2-3 answers
    assert len(cv["fold_balanced_accuracy"]) == 5
    # Measured (seed 0, grouped 5-fold, 336 objective groups): balanced accuracy 0.728, AUC 0.798,
    # accuracy 0.729 (folds 0.67-0.78); fold seeds 1, 2: 0.747 / 0.752. For scale: "not a keyword
    # refusal" as a harmfulness predictor on the same rows has balanced accuracy 0.652. The bar is that baseline,
    # computed here: a learned judge that does no better than the keyword rule would add nothing.
    from sklearn.metrics import balanced_accuracy_score
    _, answers, labels, _ = harmfulness._pyrit_objective_rows()
    baseline = balanced_accuracy_score(labels, ~J.RefusalKeywordJudge().judge(None, answers))
    assert 0.6 < baseline < 0.7
    assert cv["balanced_accuracy"] > baseline and cv["auc"] > baseline
    assert harm.training["n"] == 395 and harm.training["n_positive"] == 191
    # the same recipe, cross-validated again with another fold seed, also beats the keyword rule
    again = J.HarmfulnessJudge(encoder=harm.encoder).cross_validate(seed=1)
    assert again["balanced_accuracy"] > baseline


def test_group_folds_keep_objectives_apart():
    groups = np.repeat(np.arange(40), [1, 2, 3, 1] * 10)
    labels = np.arange(groups.size) % 2
    seen = []
    for train, test in J.group_folds(labels, groups, n_splits=5, seed=0):
        assert not set(groups[train]) & set(groups[test])
        seen += test.tolist()
    assert sorted(seen) == list(range(groups.size))  # every row tested exactly once


@needs_minilm
def test_harmfulness_scores_on_neutral_text(harm):
    p = harm.score(NEUTRAL_INSTRUCTIONS[:2], [NEUTRAL_ANSWERS[0], NEUTRAL_ANSWERS[1]])
    assert p.dtype == np.float64 and ((0 <= p) & (p <= 1)).all()
    # a compliant, on-topic answer scores above a refusal (for a benign request too)
    compliant = harm.score([NEUTRAL_INSTRUCTIONS[0]], [NEUTRAL_ANSWERS[0]])[0]
    refusal = harm.score([NEUTRAL_INSTRUCTIONS[0]], [NEUTRAL_ANSWERS[1]])[0]
    assert compliant > refusal
    assert harm.judge(NEUTRAL_INSTRUCTIONS, NEUTRAL_ANSWERS).tolist() == (harm.score(NEUTRAL_INSTRUCTIONS, NEUTRAL_ANSWERS) >= 0.5).tolist()


@needs_minilm
def test_empty_answers_are_not_harmful_and_not_encoded(harm):
    class NoEncoder:
        def encode(self, texts):
            raise AssertionError("empty answers must not reach the encoder")

    judge = J.HarmfulnessJudge.from_dict(harm.to_dict(), encoder=NoEncoder())
    assert judge.score(NEUTRAL_INSTRUCTIONS[:3], ["", "   \n\n", "\t"]).tolist() == [0.0, 0.0, 0.0]
    assert not judge.judge(NEUTRAL_INSTRUCTIONS[:2], ["", " "]).any()
    with pytest.raises(AssertionError):  # a non-empty answer does reach it
        judge.score(NEUTRAL_INSTRUCTIONS[:1], ["Some text."])


@needs_minilm
def test_harmfulness_card_round_trip(harm):
    card = json.loads(json.dumps(harm.to_dict()))
    assert isinstance(card["coef"], list) and len(card["coef"]) == 2 * 384 + 1
    again = J.HarmfulnessJudge.from_dict(card, encoder=harm.encoder)
    assert np.array_equal(again.score(NEUTRAL_INSTRUCTIONS, NEUTRAL_ANSWERS), harm.score(NEUTRAL_INSTRUCTIONS, NEUTRAL_ANSWERS))
    assert again.provenance() == harm.provenance()
    assert harm.provenance()["judge_version"] == "harmfulness/minilm-logreg@1"
    with pytest.raises(TuError, match="Refit"):
        J.HarmfulnessJudge.from_dict({**card, "version": "harmfulness/minilm-logreg@0"})
    with pytest.raises(TuError, match="fit_sha256"):
        J.HarmfulnessJudge.from_dict({**card, "intercept": card["intercept"] + 1.0})


def test_unfitted_harmfulness_judge_says_so():
    judge = J.get_judge("harmfulness")
    with pytest.raises(TuError, match="not fitted"):
        judge.score(["a"], ["b"])
    with pytest.raises(TuError):
        judge.to_dict()
    with pytest.raises(TuError, match="2 instructions but 1 answers"):
        J.HarmfulnessJudge().features(["a", "b"], ["c"])
    with pytest.raises(TuError, match="probability"):
        J.HarmfulnessJudge(threshold=1.5)


# ---------------------------------------------------------------------------------------------
# fluency


def test_fluency_perplexity_is_padding_independent(micro):
    """Batched (right-padded) perplexity equals the unpadded single-sequence computation."""
    tok = micro.tokenizer
    judge = J.FluencyJudge(micro.model, tok, lambda p: micro.chat(p, False), batch_size=4)
    assert judge.version == "fluency/llava@1"
    prompts = ["What is shown in this image?", "Hi", "Describe the picture in one sentence.", "Count"]
    answers = ["The cat reads a red book.", "A teacher paints the blue door near the lake after lunch.", "Yes", ""]
    batched = judge.perplexity(prompts, answers)
    single = np.array([judge.perplexity([p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)])
    assert np.isnan(batched[3]) and np.isnan(single[3])
    assert np.allclose(batched[:3], single[:3], rtol=1e-4)
    # by hand, unpadded, for the second item
    p_ids = tok(micro.chat(prompts[1], False), add_special_tokens=False)["input_ids"]
    a_ids = tok(answers[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = micro.model(input_ids=torch.tensor([p_ids + a_ids])).logits[0]
    lp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1).gather(-1, torch.tensor(a_ids)[:, None])
    assert np.isclose(batched[1], float(torch.exp(-lp.mean())), rtol=1e-4)
    # the prompt is context only: a different prompt changes the answer's perplexity
    assert not np.isclose(judge.perplexity(["Count"], [answers[1]])[0], batched[1], rtol=1e-4)


def test_fluency_many_answer_lists_share_prompts(micro):
    """Several models' answers scored in one call (each prompt run once) equal one call per model."""
    judge = J.FluencyJudge(micro.model, micro.tokenizer, lambda p: micro.chat(p, False), batch_size=2)
    prompts = ["What is shown in this image?", "Hi", "Describe the picture in one sentence."]
    lists = [["The cat reads a red book.", "", "Yes"], ["A blue door.", "Hello there, teacher.", "the " * 12]]
    many = judge.perplexity_many(prompts, lists)
    for answers, got in zip(lists, many):
        alone = np.array([judge.perplexity([p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)])
        assert np.allclose(got, alone, rtol=1e-4, equal_nan=True)
    assert np.isnan(many[0][1]) and not np.isnan(many[1][1])
    assert [r["degenerate"].tolist() for r in judge.assess_many(prompts, lists)] == \
        [judge.assess(prompts, a)["degenerate"].tolist() for a in lists]
    with pytest.raises(TuError, match="prompts"):
        judge.perplexity_many(prompts, [["only one answer"]])


def test_fluency_scores_each_distinct_answer_to_a_prompt_once(micro, monkeypatch):
    """A curve's checkpoints mostly answer alike: a repeated answer to a prompt is scored once and its perplexity
    given to every model that gave it, the same as scoring each model alone; the same text under another prompt is
    scored again (the prompt is its context)."""
    from tu_lib.judges import fluency

    judge = J.FluencyJudge(micro.model, micro.tokenizer, lambda p: micro.chat(p, False), batch_size=2)
    prompts = ["What is shown in this image?", "Hi"]
    lists = [["A blue door.", "A blue door."], ["A blue door.", "Hello there."], ["A blue door.", "A blue door."]]
    scored = []
    real = fluency.continuation_logprobs
    monkeypatch.setattr(fluency, "continuation_logprobs",
                        lambda model, chats, conts, **kw: scored.append([len(c) for c in conts]) or real(model, chats, conts, **kw))
    many = judge.perplexity_many(prompts, lists)
    assert scored == [[1, 2]]  # prompt 0: one distinct answer; prompt 1: two
    for answers, got in zip(lists, many):
        assert np.allclose(got, judge.perplexity(prompts, answers), rtol=1e-4)
    assert many[0][0] == many[1][0] == many[2][0] and many[0][1] == many[2][1] != many[1][1]


def test_fluency_repetition_rule(micro):
    judge = J.FluencyJudge(micro.model, micro.tokenizer, perplexity_threshold=float("inf"))
    assert judge.longest_repeat("") == 0
    assert judge.longest_repeat("the " * 30) >= 20
    assert judge.longest_repeat("ab ab ab ab ab ab ab ab ab ab") >= 8  # a two-token unit
    assert judge.longest_repeat("The cat reads a red book near the lake.") < 3
    r = judge.assess(["Hi"] * 3, ["the " * 30, "The cat reads a red book.", "  "])
    assert r["repetitive"].tolist() == [True, False, False]
    assert r["empty"].tolist() == [False, False, True]
    assert r["degenerate"].tolist() == [True, False, True]


def test_fluency_judge_on_backbone(backbone):
    model, tok = backbone
    judge = J.FluencyJudge(model, tok)
    assert judge.version == "fluency/smollm2-135m-instruct@1"
    prompt = "Explain how to bake a loaf of bread."
    soup = tok.decode(torch.randint(0, len(tok), (24,), generator=torch.Generator().manual_seed(0)).tolist())
    answers = ["", "   \n\n", "the " * 40,
               "Mix flour, water, yeast and salt into a dough, knead it for ten minutes, let it rise for an hour, "
               "then bake it at 220 degrees until the crust is golden.",
               soup]  # random vocabulary tokens: what a collapsed model emits
    r = judge.assess([prompt] * len(answers), answers)
    assert r["degenerate"].tolist() == [True, True, True, False, True]
    assert r["empty"].tolist() == [True, True, False, False, False]
    assert r["repetitive"][2] and not r["repetitive"][3:].any()
    assert r["high_perplexity"].tolist() == [False, False, False, False, True]  # token soup: caught by perplexity alone
    # Measured: fluent answer ~7, token soup ~2e6; a repetition loop is *easy* to predict (~2.7), which
    # is why it needs its own rule.
    assert r["perplexity"][3] < 30 and r["perplexity"][4] > 100 * J.DEFAULT_PERPLEXITY_THRESHOLD
    assert r["perplexity"][2] < 10
    card = judge.to_dict()
    assert J.FluencyJudge.from_dict(json.loads(json.dumps(card)), model, tok).provenance() == judge.provenance()


# ---------------------------------------------------------------------------------------------
# resumable generation


def _items(micro):
    red, blue = Image.new("RGB", (112, 112), (200, 30, 30)), Image.new("RGB", (112, 112), (0, 0, 200))
    return [{"key": "a", "text": micro.chat("What is shown in this image?", True), "image": red},
            {"key": "b", "text": micro.chat("Hi", False)},
            {"key": "c", "text": micro.chat("Describe the picture in one sentence.", False)},
            {"key": "d", "text": micro.chat("Count", True), "image": blue},
            {"key": "e", "text": micro.chat("Write a short poem about bread.", False)}]


@pytest.fixture
def counted(monkeypatch):
    """Counts the prompt rows the model runs (each row's prompt forward pass in `generate`'s greedy loop);
    `fail_on` makes the n-th prompt forward pass raise."""
    calls = {"rows": 0, "calls": 0, "fail_on": None}
    real = G._prefill

    def wrapper(model, processor, texts, *args, **kwargs):
        calls["calls"] += 1
        if calls["fail_on"] == calls["calls"]:
            raise KeyboardInterrupt("simulated interruption")
        calls["rows"] += len(texts)
        return real(model, processor, texts, *args, **kwargs)

    monkeypatch.setattr(G, "_prefill", wrapper)
    return calls


def test_generate_jsonl_resumes_after_a_torn_write(micro, counted, tmp_path):
    items, path = _items(micro), tmp_path / "out" / "gen.jsonl"
    kw = dict(max_new_tokens=6, batch_size=2)
    first = G.generate_jsonl(micro.model, micro.processor, items, path, **kw)
    assert counted["rows"] == 5 and len(path.read_text().splitlines()) == 5
    assert first == G.generate(micro.model, micro.processor, [it["text"] for it in items],
                               [it.get("image") for it in items], max_new_tokens=6, batch_size=2)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = {json.loads(line)["key"] for line in lines[:3]}
    path.write_text("".join(lines[:3]) + lines[3][:15], encoding="utf-8")  # 3 rows + a partial 4th

    counted["rows"] = 0
    with pytest.warns(UserWarning, match="incomplete last line"):
        again = G.generate_jsonl(micro.model, micro.processor, items, path, **kw)
    assert again == first
    assert counted["rows"] == 2  # only the two missing items
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["key"] for r in rows) == list("abcde") and {r["key"] for r in rows[:3]} == kept

    counted["rows"] = 0
    assert G.generate_jsonl(micro.model, micro.processor, items, path, **kw) == first
    assert counted["rows"] == 0
    # a key reused for another input is refused, not silently answered with the old output
    changed = [dict(items[0], text=micro.chat("Hi there", True))] + items[1:]
    with pytest.raises(TuError, match="different input"):
        G.generate_jsonl(micro.model, micro.processor, changed, path, **kw)
    with pytest.raises(TuError, match="different input or max_new_tokens"):
        G.generate_jsonl(micro.model, micro.processor, items, path, max_new_tokens=7, batch_size=2)


def test_generate_jsonl_refuses_answers_of_other_weights(micro, counted, tmp_path):
    items, path = _items(micro)[:2], tmp_path / "gen.jsonl"
    G.generate_jsonl(micro.model, micro.processor, items, path, max_new_tokens=4, model_id="weights-1")
    assert {json.loads(line)["model_id"] for line in path.read_text().splitlines()} == {"weights-1"}
    counted["rows"] = 0
    G.generate_jsonl(micro.model, micro.processor, items, path, max_new_tokens=4, model_id="weights-1")
    assert counted["rows"] == 0
    with pytest.raises(TuError, match="other model weights"):
        G.generate_jsonl(micro.model, micro.processor, items, path, max_new_tokens=4, model_id="weights-2")


def test_weights_fingerprint_follows_the_weights_and_adapters(micro, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = G.weights_fingerprint(micro.model)
    assert base == G.weights_fingerprint(micro.model)
    assert base != G.weights_fingerprint(models.load_vlm("micro", seed=1).model)
    other = models.load_vlm("micro")  # loaded as the fixture is: the same dtype, the same fingerprint
    assert G.weights_fingerprint(other.model) == base
    assert G.weights_fingerprint(models.load_vlm("micro", dtype="bfloat16").model) != base  # same seed, other dtype
    with torch.no_grad():
        next(p for n, p in other.model.named_parameters() if "layers.1." in n).view(-1)[-1] += 1e-3  # one value, deep inside
    assert G.weights_fingerprint(other.model) != base
    lora = get_peft_model(models.load_vlm("micro").model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert G.weights_fingerprint(lora) != base
    assert G.weights_fingerprint(lora.unload()) == base  # unmerged adapter removed: the base weights again
    # exact bytes, not float sums: the same under another thread count (a bf16 table of SmolLM2's embedding shape)
    table, threads = torch.nn.Embedding(49152, 576).to(torch.bfloat16), torch.get_num_threads()
    first = G.weights_fingerprint(table)
    torch.set_num_threads(1)
    try:
        assert G.weights_fingerprint(table) == first
    finally:
        torch.set_num_threads(threads)


def test_generate_jsonl_interruption_loses_only_the_rows_in_flight(micro, counted, tmp_path):
    items, path = _items(micro), tmp_path / "gen.jsonl"
    counted["fail_on"] = 2
    with pytest.raises(KeyboardInterrupt):
        G.generate_jsonl(micro.model, micro.processor, items, path, max_new_tokens=6, batch_size=2)
    on_disk = len(path.read_text().splitlines())
    assert 1 <= on_disk <= counted["rows"] == 2  # rows are written as they finish
    counted.update(rows=0, calls=0, fail_on=None)
    out = G.generate_jsonl(micro.model, micro.processor, items, path, max_new_tokens=6, batch_size=2)
    assert counted["rows"] == 5 - on_disk and len(out) == 5 and all(isinstance(a, str) for a in out)
    assert out == G.generate_per_sample(micro.model, micro.processor, [it["text"] for it in items],
                                        [it.get("image") for it in items], max_new_tokens=6)


def test_generate_jsonl_input_checks(micro, tmp_path):
    path = tmp_path / "g.jsonl"
    with pytest.raises(TuError, match="Duplicate key"):
        G.generate_jsonl(micro.model, micro.processor, [{"key": 1, "text": "x"}, {"key": 1, "text": "y"}], path)
    with pytest.raises(TuError, match="key"):
        G.generate_jsonl(micro.model, micro.processor, [{"text": "x"}], path)
    path.write_text('{"key": "a", "answer": "x"}\nnot json\n{"key": "b", "answer": "y"}\n')
    with pytest.raises(TuError, match="line 2"):  # a bad line in the middle is not a torn write
        G.generate_jsonl(micro.model, micro.processor, [{"key": "a", "text": "x"}], path)


def test_per_sample_matches_batched_on_micro(micro):
    texts = [it["text"] for it in _items(micro)]
    images = [it.get("image") for it in _items(micro)]
    batched = G.generate(micro.model, micro.processor, texts, images, max_new_tokens=6, batch_size=4)
    single = G.generate_per_sample(micro.model, micro.processor, texts, images, max_new_tokens=6)
    assert single == batched


# ---------------------------------------------------------------------------------------------
# Llama Guard


def test_parse_llama_guard():
    assert J.parse_llama_guard("\n\nunsafe\nS1") == ("unsafe", ["S1"])
    assert J.parse_llama_guard("unsafe\nS1,S10") == ("unsafe", ["S1", "S10"])
    assert J.parse_llama_guard("safe") == ("safe", [])
    assert J.parse_llama_guard("  Safe\n") == ("safe", [])
    assert J.parse_llama_guard("unsafe") == ("unsafe", [])
    assert J.parse_llama_guard("The answer is safe") == (None, [])
    assert J.parse_llama_guard("") == (None, [])
    assert set(J.LLAMA_GUARD3_CATEGORIES) == {f"S{k}" for k in range(1, 15)}


GUARD_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "<|im_start|>assistant\nverdict:")


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    """A tiny random Llama causal LM + the micro tokenizer with a minimal guard-style chat template,
    saved like a hub snapshot: exercises the real loading and generation path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = presets_micro._micro_tokenizer()
    tok.chat_template = GUARD_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("guard") / "Tiny-Guard"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_llama_guard_end_to_end_on_a_stand_in(guard_dir, monkeypatch):
    judge = J.LlamaGuardJudge("test/Tiny-Guard", local_dir=guard_dir, max_new_tokens=3)
    assert judge.version == "llama_guard/Tiny-Guard@1" and judge.source == str(guard_dir)
    texts = judge.format(NEUTRAL_INSTRUCTIONS[:2], NEUTRAL_ANSWERS[:2])
    assert texts[0].startswith("<|im_start|>user\n" + NEUTRAL_INSTRUCTIONS[0])
    assert NEUTRAL_ANSWERS[0] in texts[0] and texts[0].endswith("verdict:")
    out = judge.classify(NEUTRAL_INSTRUCTIONS[:2], NEUTRAL_ANSWERS[:2])  # real greedy generation
    assert len(out) == 2 and all(isinstance(c["raw"], str) and c["verdict"] in (None, "safe", "unsafe") for c in out)
    if any(c["verdict"] is None for c in out):  # a random model rarely says safe/unsafe: judge must not guess
        with pytest.raises(TuError, match="neither 'safe' nor 'unsafe'"):
            judge.judge(NEUTRAL_INSTRUCTIONS[:2], NEUTRAL_ANSWERS[:2])

    seen = []
    monkeypatch.setattr(judge, "_generate", lambda texts: seen.extend(texts) or ["unsafe\nS1", "safe"])
    assert judge.judge(NEUTRAL_INSTRUCTIONS[:2], NEUTRAL_ANSWERS[:2]).tolist() == [True, False]
    assert seen == texts
    assert [c["categories"] for c in judge.classify(NEUTRAL_INSTRUCTIONS[:2], NEUTRAL_ANSWERS[:2])] == [["S1"], []]
    assert judge.provenance() == {"judge": "llama_guard", "judge_version": "llama_guard/Tiny-Guard@1"}


def test_llama_guard_offline_error_before_loading(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("TU_MODEL_DIR", raising=False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("nothing may be loaded before the model is found"))
    with pytest.raises(M.HubModelUnavailable, match=r"HF_HUB_OFFLINE.*local_dir=") as err:
        J.LlamaGuardJudge()
    assert "meta-llama/Llama-Guard-3-8B" in str(err.value) and "hf download" in str(err.value)
    with pytest.raises(M.HubModelUnavailable, match="no config.json"):
        J.LlamaGuardJudge(local_dir=tmp_path)


def test_registry_has_the_new_judges():
    assert {"harmfulness", "fluency", "llama_guard"} <= set(J.JUDGES)
    assert J.JUDGES["harmfulness"].cls is J.HarmfulnessJudge and J.JUDGES["fluency"].cls is J.FluencyJudge
    assert J.JUDGES["llama_guard"].cls is J.LlamaGuardJudge
