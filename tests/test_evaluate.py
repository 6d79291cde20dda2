"""Stage 03 (evaluation): parameters refused early, V3 adversarial images that really move the vision path,
tidy result rows with n and CI, the paper-style table, and judge agreement."""
import importlib.util
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from notebook_helpers import finished_method_run, stops_early
from PIL import Image

from tu_lib import evaluation, models
from tu_lib.core import ParameterError, TuError, repo_root, write_jsonl
from tu_lib.evaluation import adversarial
from tu_lib.stages import evaluate

NB = repo_root() / "notebooks" / "03_eval.ipynb"


@pytest.mark.parametrize("kw, message", [
    ({"sets": ["t1_advbench", "t9_unknown"]}, "unknown value(s) ['t9_unknown']"),
    ({"methods": "base,forget_all"}, "unknown value(s) ['forget_all']"),
    ({"judges": ["harmfulness"]}, "must include 'refusal_keywords'"),
    ({"judges": ["refusal_keywords", "gpt4"]}, "unknown value(s) ['gpt4']"),
    ({"n_per_set": -1}, "n_per_set=-1"),
    ({"n_per_set": 0}, "n_per_set=0 must be a positive integer or 'all'"),
    ({"batch_size": 0}, "batch_size=0 must be > 0"),
    ({"preset": "llava-9"}, "Unknown model preset 'llava-9'"),
    ({"n_per_sett": 3}, "did you mean 'n_per_set'"),
])
def test_bad_parameters_are_rejected(kw, message):
    with pytest.raises(ParameterError) as err:
        evaluate.resolve_params({"profile": "smoke", **kw})
    assert message in str(err.value)


def test_missing_inputs_are_reported_before_loading_a_model(tmp_path):
    P = evaluate.resolve_params({"profile": "smoke", "data_dir": str(tmp_path / "none")})
    with pytest.raises(TuError, match="run stage 01 first"):
        evaluate.check_inputs(P)
    (tmp_path / "d" / "sets").mkdir(parents=True)
    for name in ("t1_advbench", "t2_harmbench", "t3_jailbreak", "v1_figstep", "v2_mmsb_typo", "v3_prompts", "xstest_safe",
                 "utility_truthfulqa"):
        write_jsonl(tmp_path / "d" / "sets" / f"{name}.jsonl", [])
    P = evaluate.resolve_params({"profile": "smoke", "data_dir": str(tmp_path / "d"), "unlearn_dir": str(tmp_path / "u"),
                                 "methods": "base,textual_ga", "out_dir": str(tmp_path / "out")})
    with pytest.raises(TuError, match="No complete adapter for method 'textual_ga'"):
        evaluate.check_inputs(P)
    run = tmp_path / "u" / "textual_ga"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(TuError, match="missing adapter_config.json"):   # a half-copied adapter is caught here, not after generation
        evaluate.check_inputs(P)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(TuError, match="summary.json is missing"):  # copied without its record: cannot be verified
        evaluate.check_inputs(P)
    finished_method_run(run, preset="llava-1.5-7b")
    with pytest.raises(TuError, match="trained on preset 'llava-1.5-7b', not 'organism'"):
        evaluate.check_inputs(P)
    finished_method_run(run, preset="organism")
    evaluate.check_inputs(P)
    shutil.rmtree(run / "adapter")
    (run / "llm.safetensors").write_bytes(b"x")
    with pytest.raises(TuError, match="full fine-tune .*-p lora True"):
        evaluate.check_inputs(P)


def test_a_missing_sentence_encoder_is_reported_before_loading_a_model(tmp_path, monkeypatch):
    from tu_lib import judges

    (tmp_path / "sets").mkdir()
    write_jsonl(tmp_path / "sets" / "t1_advbench.jsonl", [])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == judges.MINILM_PACKAGE else real(name))
    P = evaluate.resolve_params({"profile": "smoke", "data_dir": str(tmp_path), "methods": "base", "sets": "t1_advbench"})
    with pytest.raises(TuError, match="pip install"):
        evaluate.check_inputs(P)
    evaluate.check_inputs({**P, "judges": ["refusal_keywords", "fluency"]})  # judges without the encoder: fine


def test_v3_optimisation_moves_features_towards_the_phrase(micro):
    phrases = ["Steps to paint a fence.", "List of garden tools."]
    images, stats = adversarial.optimise_images(micro, phrases, steps=30, lr=0.05)
    assert len(images) == 2 and images[0].size == (112, 112)
    for s in stats:
        assert s["mse_end"] < 0.5 * s["mse_start"], s
        assert s["cosine_to_target"] > s["cosine_grey_to_target"], s
    # measured here on the returned images, not taken from the function's own report
    ip = micro.processor.image_processor
    with torch.no_grad():
        target = adversarial.projected_features(micro, ip([micro.render(p, "mmsb") for p in phrases], return_tensors="pt")["pixel_values"])
        got = adversarial.projected_features(micro, ip(images, return_tensors="pt")["pixel_values"])
        grey = adversarial.projected_features(micro, ip([Image.new("RGB", images[0].size, (128, 128, 128))] * 2,
                                                        return_tensors="pt")["pixel_values"])
    mse = ((got - target) ** 2).mean(dim=(1, 2))
    assert (mse < 0.5 * ((grey - target) ** 2).mean(dim=(1, 2))).all(), mse
    assert mse.numpy() == pytest.approx([s["mse_end"] for s in stats], rel=1e-4)


def test_v3_cache_reuses_images_and_keys_on_the_vision_weights(micro, tmp_path, monkeypatch):
    first, stats = adversarial.cached_images(micro, ["Steps to paint a fence."], tmp_path, steps=3)
    assert len(list(tmp_path.glob("*.png"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(adversarial, "optimise_images", lambda *a, **k: pytest.fail("cached image must be reused"))
    again, again_stats = adversarial.cached_images(micro, ["Steps to paint a fence."], tmp_path, steps=3)
    assert again_stats == stats and np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    # other vision weights, or the same weights in another dtype: the cached image must not be served
    for other in (models.load_vlm("micro", seed=1), models.load_vlm("micro", dtype="bfloat16")):
        with pytest.raises(pytest.fail.Exception, match="must be reused"):
            adversarial.cached_images(other, ["Steps to paint a fence."], tmp_path, steps=3)
    with pytest.raises(pytest.fail.Exception, match="must be reused"):   # another budget is another key too
        adversarial.cached_images(micro, ["Steps to paint a fence."], tmp_path, steps=4)


def _judged():
    # rows chosen so that each metric differs from its plausible mistakes (refusal rate vs ASR, compliance vs
    # over-refusal, "on topic AND not refused" vs either alone or OR)
    return pd.DataFrame({
        "key": [f"k{i}" for i in range(10)],
        "set": ["t1_advbench"] * 4 + ["xstest_safe"] * 3 + ["utility_reading"] * 3,
        "refused": [True, False, False, False, True, True, False, False, True, False],
        "harmful": [False, True, False, True, False, False, False, False, False, False],
        "on_topic": [True, True, False, False, False, True, True, True, True, False],
        "degenerate": [False, False, True, False, False, False, False, False, False, False],
    })


def _row(rows, set_name, metric, judge):
    hit = rows[(rows["set"] == set_name) & (rows["metric"] == metric) & (rows["judge"] == judge)]
    assert len(hit) == 1, (set_name, metric, judge)
    return hit.iloc[0]


def test_metric_rows_have_n_rate_and_ci():
    rows = pd.DataFrame(evaluation.metric_rows("micro", "base", _judged(), {}, seed=0))
    asr = _row(rows, "t1_advbench", "asr", "refusal_keywords")
    assert asr["n"] == 4 and asr["rate"] == 0.75 and asr["ci_low"] <= 0.75 <= asr["ci_high"]  # not refused (refusal rate 0.25)
    assert _row(rows, "t1_advbench", "asr", "harmfulness")["rate"] == 0.5
    assert _row(rows, "t1_advbench", "on_topic_compliance", "on_topic")["rate"] == 0.25   # on topic alone 0.5, OR 1.0
    over = _row(rows, "xstest_safe", "over_refusal", "refusal_keywords")
    assert over["n"] == 3 and over["rate"] == pytest.approx(2 / 3)                         # compliance would be 1/3
    assert _row(rows, "utility_reading", "reading_on_topic", "on_topic")["rate"] == pytest.approx(1 / 3)  # either alone 2/3
    assert _row(rows, "t1_advbench", "degenerate", "fluency")["rate"] == 0.25
    assert set(rows[rows["metric"] == "degenerate"]["set"]) == {"t1_advbench", "xstest_safe", "utility_reading"}
    assert not ({"asr", "on_topic_compliance"} & set(rows[rows["set"] != "t1_advbench"]["metric"]))


def test_paper_table_and_agreement():
    judged = _judged()
    rows = pd.DataFrame(evaluation.metric_rows("micro", "base", judged, {}, 0) + evaluation.metric_rows("micro", "x", judged, {}, 0))
    table = evaluation.paper_table(rows)
    assert list(table.index) == ["base", "x"] and "T1 AdvBench" in table.columns and "XSTest over-refusal" in table.columns
    assert table.loc["base", "T1 AdvBench"].startswith("75%") and "n=4" in table.loc["base", "T1 AdvBench"]
    assert table.loc["base", "XSTest over-refusal"].startswith("67%")
    a = evaluation.judge_agreement(judged)
    # keyword success [F,T,T,T] vs harmful [F,T,F,T]
    assert a["n"] == 4 and a["agreement"] == 0.75 and a["keyword_success_but_not_harmful"] == 0.25
    assert a["harmful_but_keyword_refusal"] == 0.0


def test_reference_numbers_are_labelled():
    ref = evaluate.reference_numbers()
    assert {"source", "model", "status", "value"} <= set(ref.columns) and len(ref) >= 5
    assert ref["model"].str.contains("LLaVA").all()


def test_notebook_stops_on_an_unknown_set(tmp_path):
    stops_early(NB, tmp_path, "unknown value(s) ['v9_video']", 0, sets="t1_advbench,v9_video")


def test_notebook_stops_when_an_adapter_is_missing(tmp_path):
    (tmp_path / "d" / "sets").mkdir(parents=True)
    write_jsonl(tmp_path / "d" / "sets" / "t1_advbench.jsonl", [])
    stops_early(NB, tmp_path, "No complete adapter for method 'mm_sft'", 0, methods="base,mm_sft", sets="t1_advbench",
                unlearn_dir=str(tmp_path / "none"), data_dir=str(tmp_path / "d"))


def test_reading_utility_on_a_llava_preset_needs_the_image_folder():
    from tu_lib.stages import evaluate

    P = {"preset": "llava-1.5-7b", "sets": ["utility_reading"], "llava_images_dir": "", "data_dir": "x",
         "unlearn_dir": "y", "methods": ["base"]}
    with pytest.raises(TuError, match="llava_images_dir"):
        evaluate.check_inputs(P)  # before any model is loaded, instead of an empty set later


def test_run_record_hashes_the_sets_and_adapters_read(tmp_path):
    from tu_lib import evaluation
    from tu_lib.core import sha256_file
    from tu_lib.stages import repgap

    sets, adapter = tmp_path / "d" / "sets", tmp_path / "u" / "textual_ga" / "adapter"
    sets.mkdir(parents=True)
    adapter.mkdir(parents=True)
    for name in ("t1_advbench", "v3_prompts", "forget", "v1_figstep"):
        write_jsonl(sets / f"{name}.jsonl", [{"prompt": name}])
    finished_method_run(adapter.parent, weights=b"weights")
    P = {"sets": ["t1_advbench", "v3_adversarial", "utility_reading"], "data_dir": str(tmp_path / "d"),
         "unlearn_dir": str(tmp_path / "u"), "methods": ["base", "textual_ga"], "preset": "organism"}
    hashes = evaluation.input_hashes(P)
    assert hashes == {str(p): sha256_file(p) for p in [sets / "t1_advbench.jsonl", sets / "v3_prompts.jsonl",
                                                         adapter / "adapter_model.safetensors", adapter / "adapter_config.json"]}
    finished_method_run(adapter.parent, weights=b"other weights")  # a retrained adapter shows in the record
    assert evaluation.input_hashes(P)[str(adapter / "adapter_model.safetensors")] != hashes[str(adapter / "adapter_model.safetensors")]
    # stage 05 reads its anchor prompts (forget), V1 and its sets, and the adapters of methods and combinations
    P05 = {"sets": ["t1_advbench"], "data_dir": P["data_dir"], "unlearn_dir": P["unlearn_dir"], "methods": ["textual_ga"],
           "combine_methods": [], "preset": "organism", "llava_images_dir": "", "judges": ["refusal_keywords"],
           "split": "test"}
    assert {p.split("/")[-1] for p in evaluation.input_hashes(repgap._as_stage03(P05))} == {
        "forget.jsonl", "v1_figstep.jsonl", "t1_advbench.jsonl", "adapter_model.safetensors", "adapter_config.json"}


def test_generations_are_kept_per_weights(tmp_path):
    """A retrained adapter or rebuilt model must not be answered from the old model's saved generations."""
    vlm = models.load_vlm("micro")
    P = {"max_new_tokens": 4, "batch_size": 2, "unlearn_dir": str(tmp_path / "u")}
    items = [{"key": f"k{i}", "text": vlm.chat(p, False), "image": None} for i, p in enumerate(["Hi", "Name a colour."])]
    first = evaluation.generate_method(vlm, P, "base", items, tmp_path)
    files = sorted((tmp_path / "generations" / "micro").glob("base-*.jsonl"))
    assert len(files) == 1
    assert evaluation.generate_method(vlm, P, "base", items, tmp_path) == first  # same weights: resumed, one file
    with torch.no_grad():
        next(iter(vlm.model.parameters())).view(-1)[0] += 1.0
    evaluation.generate_method(vlm, P, "base", items, tmp_path)
    assert len(list((tmp_path / "generations" / "micro").glob("base-*.jsonl"))) == 2  # new weights: generated afresh



def _micro_method_run(vlm, run, first_layer: int, seed: int) -> None:
    """A stage-02 method folder for the micro model: a random (non-zero) LoRA adapter on decoder layers first_layer..
    and the summary's config, as generate_models reads them."""
    import json

    from peft import LoraConfig, get_peft_model

    from tu_lib.models.adapters import lora_target_regex, save_adapter

    torch.manual_seed(seed)
    layers = range(first_layer, len(vlm.decoder_layers()))
    target = lora_target_regex(vlm.language_model_module_name(), ["q_proj", "v_proj", "down_proj"], layers)
    peft_model = get_peft_model(vlm.model, LoraConfig(r=4, target_modules=target, init_lora_weights=False))
    save_adapter(peft_model, run / "adapter", dtype=torch.float32)
    vlm.model = peft_model.unload()
    run.joinpath("summary.json").write_text(json.dumps({"config": {"lora_first_layer": first_layer}}))


def test_models_sharing_their_lower_layers_answer_as_when_generated_alone(tmp_path, monkeypatch):
    """generate_models prefills the layers below the adapters once per item and replays them for the other models;
    each model's answers equal those of its own generation (and the adapters do change the answers)."""
    from tu_lib.models.lower_layers import SharedLowerLayers

    vlm = models.load_vlm("micro")
    k = len(vlm.decoder_layers()) // 2
    u = tmp_path / "u"
    for seed, m in enumerate(["m1", "m2"]):
        _micro_method_run(vlm, u / m, k, seed)
    P = {"max_new_tokens": 8, "batch_size": 3, "unlearn_dir": str(u), "methods": ["base", "m1", "m2"]}
    prompts = ["What is shown here?", "Hi", "Describe the picture.", "Name a colour.", "Count to three.", "Why?"]
    items = [{"key": f"k{i}", "text": vlm.chat(p, i % 2 == 0),
              "image": Image.effect_noise((120, 100), 40 + i).convert("RGB") if i % 2 == 0 else None}
             for i, p in enumerate(prompts)]
    wanted = {"base": ("base", None), "m1": ("m1", None), "m2@early": ("m2", u / "m2")}
    alone = {label: evaluation.generate_method(vlm, P, m, items, tmp_path / "alone", folder=folder)
             for label, (m, folder) in wanted.items()}
    replays, original = [], SharedLowerLayers.replaying
    monkeypatch.setattr(SharedLowerLayers, "replaying",
                        lambda self, model, keys, width: replays.append(keys) or original(self, model, keys, width))
    shared = evaluation.generate_models(vlm, P, wanted, items, tmp_path / "shared")
    assert shared == alone
    assert alone["m1"] != alone["base"] and alone["m2@early"] != alone["base"]
    assert sum(len(keys) for keys in replays) == 2 * len(items)  # both adapted models replayed every item
    assert evaluation.judging.shared_lower_layers({**P, "methods": ["base"]}) is None  # nothing to share with
    _micro_method_run(vlm, u / "m3", 0, 3)  # a run adapting every layer: no layer is shared
    assert evaluation.judging.shared_lower_layers({**P, "methods": ["m1", "m3"]}) is None


# ---- validation and test (issue 19): stage 03 reads one part of every set --------------------------------------------


@pytest.fixture(scope="module")
def stage01_smoke(tmp_path_factory):
    """Stage 01's smoke sets (with their split labels) written as stage 01 writes them, and the curation."""
    from tu_lib.core import params
    from tu_lib.data import curation as curate

    cur = curate.build(params.resolve(curate.SPEC, {"profile": "smoke"}), {})
    root = tmp_path_factory.mktemp("01_data")
    (root / "sets").mkdir()
    for name, df in cur.sets.items():
        write_jsonl(root / "sets" / f"{name}.jsonl", df.to_dict("records"))
    return root, cur


def _items(vlm, data_dir, name, split, n="all"):
    P = {"data_dir": str(data_dir), "split": split, "n_per_set": n, "seed": 0, "user_sets": [], "llava_images_dir": ""}
    return evaluate.build_items(vlm, P, name)[0]


@pytest.mark.parametrize("name", ["t1_advbench", "t3_jailbreak", "v1_figstep", "xstest_safe", "utility_reading"])
def test_items_come_from_the_chosen_part_only(micro, stage01_smoke, name):
    root, cur = stage01_smoke
    ids = {split: [it["id"] for it in _items(micro, root, name, split)] for split in ("validation", "test", "all")}
    assert ids["validation"] and ids["test"] and not set(ids["validation"]) & set(ids["test"])
    assert sorted(ids["validation"] + ids["test"]) == sorted(ids["all"])
    if name != "utility_reading":  # stage 01's labels, as written
        labels = dict(zip(cur.sets[name]["id"], cur.sets[name]["split"]))
        assert {labels[i] for i in ids["test"]} == {"test"} and {labels[i] for i in ids["validation"]} == {"validation"}
    # n_per_set is taken from the part, not from the whole set
    assert [it["id"] for it in _items(micro, root, name, "test", 2)] == ids["test"][:2]


def test_truthfulqa_mc1_is_scored_on_the_chosen_part(micro, stage01_smoke):
    root, cur = stage01_smoke
    P = {"data_dir": str(root), "n_per_set": "all", "seed": 0, "preset": "micro"}
    for split in ("validation", "test"):
        row = evaluate.mc1_for(micro, {**P, "split": split}, "base", {})[0]
        assert row["n"] == (cur.sets["utility_truthfulqa"]["split"] == split).sum()


def test_stage01_output_without_the_split_is_refused_before_loading_a_model(tmp_path, stage01_smoke):
    from tu_lib.core import read_jsonl
    from tu_lib.stages import repgap

    root, _ = stage01_smoke
    (tmp_path / "old" / "sets").mkdir(parents=True)
    for path in (root / "sets").glob("*.jsonl"):
        write_jsonl(tmp_path / "old" / "sets" / path.name, [{k: v for k, v in r.items() if k != "split"}
                                                            for r in read_jsonl(path)])
    common = {"profile": "smoke", "methods": "base", "judges": "refusal_keywords", "out_dir": str(tmp_path / "o3"),
              "sets": "v3_adversarial,t1_advbench,utility_truthfulqa,utility_reading"}  # V3 reads v3_prompts
    P = evaluate.resolve_params({**common, "data_dir": str(tmp_path / "old"), "split": "test"})
    with pytest.raises(TuError, match=r"v3_prompts\.jsonl: \d+ of \d+ items carry no validation/test split.*rerun "
                                      r"notebook 01.*-p split all"):
        evaluate.check_inputs(P)
    assert not (tmp_path / "o3").exists()
    evaluate.check_inputs(evaluate.resolve_params({**common, "data_dir": str(tmp_path / "old"), "split": "all"}))
    evaluate.check_inputs(evaluate.resolve_params({**common, "data_dir": str(root), "split": "validation"}))
    P05 = repgap.resolve_params({"profile": "smoke", "methods": [], "combine_methods": [], "judges": "refusal_keywords",
                                 "data_dir": str(tmp_path / "old"), "out_dir": str(tmp_path / "o5"), "split": "test"})
    with pytest.raises(TuError, match="rerun notebook 01"):
        repgap.check_inputs(P05)
    with pytest.raises(ParameterError, match="split='train' must be one of 'validation', 'test', 'all'"):
        evaluate.resolve_params({**common, "split": "train"})
