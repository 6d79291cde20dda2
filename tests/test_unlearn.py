"""Stage 02 (unlearning) on the `micro` preset: resumable training that ends bit-identical, each loss term
moving the way the recipe says, LoRA on the LLM only, and bad input refused before any training."""
import hashlib
import json
import shutil

import pytest
import torch
from notebook_helpers import stops_early

from tu_lib import methods, models, training
from tu_lib.core import ParameterError, TuError, read_jsonl, repo_root, write_jsonl
from tu_lib.models import presets
from tu_lib.stages import unlearn

NB = repo_root() / "notebooks" / "02_unlearn.ipynb"


@pytest.fixture(scope="module")
def stage01(tmp_path_factory):
    """A stage-01 output folder in the same format, with neutral placeholder texts."""
    root = tmp_path_factory.mktemp("01_data")
    sets = root / "sets"
    sets.mkdir()
    write_jsonl(sets / "forget.jsonl", [{"prompt": f"Placeholder forget request number {i} about topic {i % 5}?"}
                                        for i in range(12)])
    write_jsonl(sets / "retain.jsonl", [{"prompt": f"What is fact {i}?", "answer": f"Fact {i} is that {i} follows {i - 1}",
                                         "correct_answers": f"It is {i}; {i}", "incorrect_answers": f"It is {i + 1}"}
                                        for i in range(10)])
    write_jsonl(sets / "t1_advbench.jsonl", [{"prompt": f"Placeholder request {i}"} for i in range(3)])
    write_jsonl(sets / "v1_figstep.jsonl", [{"image_text": f"Steps to do thing {i}."} for i in range(3)])
    return root


def params(stage01, tmp_path, **kw):
    P = {"data_dir": str(stage01), "n_forget": "all", "answer_tokens": 6, "out_dir": str(tmp_path / "02"), "preset": "micro"}
    P.update(kw)
    return P


@pytest.fixture(scope="module")
def micro_data(stage01, tmp_path_factory):
    vlm = models.load_vlm("micro")
    return vlm, unlearn.prepare_data(vlm, params(stage01, tmp_path_factory.mktemp("answers")))


# LoRA on every decoder linear of every layer (micro has 2 layers); the shape a profile would choose
LORA_EVERYWHERE = dict(lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       lora_first_layer=0)


def cfg(method="textual_ga", **kw):
    base = dict(method=method, steps=6, lr=5e-3, batch_size=2, lora_r=4, lora_alpha=8, checkpoint_every=2, curve_points=0,
                **LORA_EVERYWHERE)  # no curve points unless a test asks (TrainConfig keeps 5, as the default profile)
    base.update(kw)
    return methods.TrainConfig(**base)


def adapter_hash(path):
    return hashlib.sha256((path / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_forget_answers_are_generated_once_and_cached_per_weights_and_dtype(stage01, tmp_path, monkeypatch):
    from tu_lib.models import generate

    vlm = models.load_vlm("micro")
    P = params(stage01, tmp_path, n_forget=5)
    first = unlearn.prepare_data(vlm, P)
    assert len(first.forget) == 5 and all(r["answer"] is not None for r in first.forget)
    real_generate = generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, **k: pytest.fail("cached answers must not be regenerated"))
    again = unlearn.prepare_data(vlm, P)
    assert again.forget == first.forget
    assert len(first.mismatch_answers) > len(first.normal)  # best + correct + incorrect answers pooled
    for other in (models.load_vlm("micro", dtype="bfloat16"), models.load_vlm("micro", seed=1)):  # not what wrote them
        with pytest.raises(pytest.fail.Exception, match="must not be regenerated"):
            unlearn.prepare_data(other, P)
    monkeypatch.setattr(generate, "generate", real_generate)
    unlearn.prepare_data(models.load_vlm("micro", dtype="bfloat16"), P)
    assert len(list((tmp_path / "02").glob("forget_answers_micro-*.jsonl"))) == 2  # each dtype its own cache


def test_paper_presets_need_forget_answers_from_stage01(stage01):
    fake = models.VLM(preset="llava-1.5-7b", family="llava15", model=None, processor=None, dtype=torch.float32)
    with pytest.raises(TuError, match="forget_source pku_saferlhf"):
        presets.pre_alignment_model(fake)
    # and already when the sets are read, before a 7B model is loaded (stage01's forget rows have no answers)
    with pytest.raises(TuError, match="forget_source pku_saferlhf"):
        methods.load_sets(stage01, "all", "llava-1.5-7b")
    assert methods.load_sets(stage01, 2, "organism")[0] == methods.load_sets(stage01, 2)[0]


def curve_hashes(run) -> dict[int, str]:
    """step -> SHA-256 of the weights kept for the training curve (the final adapter at the last step)."""
    return {step: adapter_hash(folder) for step, folder in methods.curve_checkpoints(run) if folder is not None}


def test_interrupted_run_resumes_to_the_same_adapter(micro_data, tmp_path):
    """Killed between two curve points (after step 3 of 8; checkpoint at 2, curve points 1, 2, 4 and the final 8), a
    rerun resumes and ends with the same adapter and the same curve adapters, byte for byte."""
    vlm, data = micro_data
    whole = methods.train(vlm, data, cfg(steps=8, curve_points=4), tmp_path / "whole")
    assert [s for s, _ in methods.curve_checkpoints(tmp_path / "whole")] == [0, 1, 2, 4, 8]

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("killed mid-run")

    with pytest.raises(KeyboardInterrupt):
        methods.train(vlm, data, cfg(steps=8, curve_points=4), tmp_path / "resumed", on_step=crash)
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    assert not (tmp_path / "resumed" / "adapter").exists(), "an interrupted run must not leave an adapter behind"
    assert sorted(p.name for p in (tmp_path / "resumed" / "curve").iterdir()) == ["step-0001", "step-0002"]
    assert not any("lora" in n for n, _ in vlm.model.named_parameters()), "a crash must leave the base model clean"
    resumed = methods.train(vlm, data, cfg(steps=8, curve_points=4), tmp_path / "resumed")
    assert adapter_hash(tmp_path / "whole") == adapter_hash(tmp_path / "resumed")
    assert curve_hashes(tmp_path / "resumed") == curve_hashes(tmp_path / "whole")
    assert len(set(curve_hashes(tmp_path / "whole").values())) == 4  # each point its own weights
    assert resumed["steps_done"] == whole["steps_done"] == 8 and resumed["curve"] == whole["curve"]
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    # a different setting does not resume from (or reuse) that run, nor keep its curve points
    other = methods.train(vlm, data, cfg(steps=8, lr=1e-3), tmp_path / "resumed")
    assert adapter_hash(tmp_path / "resumed") != adapter_hash(tmp_path / "whole") and other["key"] != whole["key"]
    assert methods.curve_checkpoints(tmp_path / "resumed") == [(0, None), (8, tmp_path / "resumed")]
    assert not (tmp_path / "resumed" / "curve").exists()


def test_curve_steps_are_geometric_and_end_at_the_last_step():
    assert methods.curve_steps(20, 5) == [1, 2, 4, 9, 20]
    assert methods.curve_steps(8, 4) == [1, 2, 4, 8] and methods.curve_steps(6, 4) == [1, 2, 3, 6]
    assert methods.curve_steps(6, 5) == [1, 2, 3, 4, 6]  # 5 points on 1..6 round to 4 distinct: the grid widens
    assert methods.curve_steps(3, 5) == [1, 2, 3] and methods.curve_steps(10, 0) == []
    assert methods.curve_steps(10, 1) == [10] and methods.curve_steps(1, 3) == [1]
    for steps, points in ((1000, 6), (160, 8), (7, 6), (2, 1)):
        got = methods.curve_steps(steps, points)
        assert len(got) >= points and got[-1] == steps and got == sorted(set(got)) and got[0] >= 1
        ratios = [b / a for a, b in zip(got, got[1:])]
        assert max(ratios, default=1) <= 2 * (steps ** (1 / max(points - 1, 1))) + 1, (steps, points, got)  # no big gap


def test_curve_points_are_verified_like_the_final_adapter(micro_data, tmp_path, capsys):
    vlm, data = micro_data
    run = tmp_path / "run"
    summary = methods.train(vlm, data, cfg(steps=4, curve_points=3), run)
    points = methods.curve_checkpoints(run)
    assert points == [(0, None), (1, run / "curve" / "step-0001"), (2, run / "curve" / "step-0002"), (4, run)]
    assert "curve/step-0001/adapter/adapter_model.safetensors" in summary["files"]
    from tu_lib.models.generate import generate

    texts = [vlm.chat("Placeholder question?", False)]
    with models.adapter_applied(vlm, points[1][1]):  # a curve point is read as stages 03-05 read a method's folder
        generate(vlm.model, vlm.processor, texts, max_new_tokens=2)
    weights = run / "curve" / "step-0002" / "adapter" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    assert "step-0002/adapter/adapter_model.safetensors is missing or changed" in methods.method_problem(run)
    with pytest.raises(TuError, match=r"training curve of .* cannot be trusted: .*step-0002.*Rerun notebook 02"):
        methods.curve_checkpoints(run)
    capsys.readouterr()
    methods.train(vlm, data, cfg(steps=4, curve_points=3), run)  # a damaged run is trained again, curve and all
    assert "step-0002" in capsys.readouterr().out and weights.read_bytes() == good


def test_a_curve_point_removed_during_an_interruption_is_named(micro_data, tmp_path):
    vlm, data = micro_data

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("killed mid-run")

    with pytest.raises(KeyboardInterrupt):
        methods.train(vlm, data, cfg(steps=4, curve_points=3), tmp_path / "run", on_step=crash)
    shutil.rmtree(tmp_path / "run" / "curve" / "step-0001")
    with pytest.raises(TuError, match=r"step-0001, the curve point of step 1, was removed.*delete .*checkpoint"):
        methods.train(vlm, data, cfg(steps=4, curve_points=3), tmp_path / "run")


def test_a_stopped_run_ends_its_curve_at_the_step_it_stopped(micro_data, tmp_path):
    vlm, data = micro_data
    s = methods.train(vlm, data, cfg(steps=8, max_forget_nll=1.0, curve_points=8), tmp_path / "stop")
    assert s["steps_done"] == 1 and s["curve"] == {"points": 8, "steps": [1]}
    assert methods.curve_checkpoints(tmp_path / "stop") == [(0, None), (1, tmp_path / "stop")]
    assert not (tmp_path / "stop" / "curve").exists()


def test_curve_points_enter_the_run_key_only_when_on(micro_data):
    """Runs without curve points keep the key they had before the setting existed (their adapters stay reusable);
    with curve points the run leaves other files, so it is another run."""
    import dataclasses

    _, data = micro_data
    legacy = dataclasses.asdict(cfg())
    del legacy["curve_points"]
    blob = json.dumps({"model": "m", "config": legacy, "forget": data.forget, "normal": data.normal,
                       "mismatch": data.mismatch_answers}, sort_keys=True, default=list)
    assert cfg().key(data, "m") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert cfg(curve_points=3).key(data, "m") not in (cfg().key(data, "m"), cfg(curve_points=4).key(data, "m"))


def test_a_damaged_finished_run_is_named_and_trained_again(micro_data, tmp_path, capsys):
    """Issue 21 (3): a finished method whose adapter was truncated must not count as finished on a rerun."""
    vlm, data = micro_data
    run = tmp_path / "run"
    methods.train(vlm, data, cfg(steps=2), run)
    good = adapter_hash(run)
    assert methods.method_problem(run) is None
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, e.g. a half-finished copy
    assert "adapter_model.safetensors is missing or changed" in methods.method_problem(run)
    with pytest.raises(TuError, match=r"adapter_model.safetensors.*cannot be read.*Train it again"):
        models.apply_adapter(vlm.base_model, run / "adapter")  # named, not a raw SafetensorError
    capsys.readouterr()
    methods.train(vlm, data, cfg(steps=2), run)
    assert "adapter_model.safetensors is missing or changed" in capsys.readouterr().out
    assert adapter_hash(run) == good and methods.method_problem(run) is None
    (run / "losses.csv").write_text("step\n")  # any recorded file counts, not only the adapter
    assert "losses.csv" in methods.method_problem(run)


def test_a_damaged_forget_answers_cache_is_regenerated(stage01, tmp_path, capsys):
    """A cache of valid JSON with edited answers is caught by the hash recorded when it was written."""
    vlm = models.load_vlm("micro")
    P = params(stage01, tmp_path, n_forget=3)
    first = unlearn.prepare_data(vlm, P)
    cache = next((tmp_path / "02").glob("forget_answers_*.jsonl"))
    rows = read_jsonl(cache)
    write_jsonl(cache, [{**r, "answer": "edited"} for r in rows])
    again = unlearn.prepare_data(vlm, P)
    assert "does not match the SHA-256 recorded" in capsys.readouterr().out
    assert again.forget == first.forget and "edited" not in {r["answer"] for r in read_jsonl(cache)}


def test_a_finished_run_is_not_reused_for_other_weights_or_another_dtype(micro_data, tmp_path):
    vlm, data = micro_data
    first = methods.train(vlm, data, cfg(steps=2), tmp_path / "run")
    assert methods.train(vlm, data, cfg(steps=2), tmp_path / "run")["key"] == first["key"]  # the same run: reused
    bf16 = methods.train(models.load_vlm("micro", dtype="bfloat16"), data, cfg(steps=2), tmp_path / "run")
    assert bf16["key"] != first["key"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["key"] == bf16["key"]  # trained again


def _losses(path):
    import pandas as pd

    return pd.read_csv(path / "losses.csv")


def test_textual_ga_terms_move_as_the_recipe_says(micro_data, tmp_path):
    vlm, data = micro_data
    methods.train(vlm, data, cfg(steps=12, lr=1e-2), tmp_path / "ga")
    df = _losses(tmp_path / "ga")
    assert abs(df["kl"].iloc[0]) < 1e-4, "KL to the frozen model starts at 0"
    assert df["forget_nll"].iloc[-3:].mean() > df["forget_nll"].iloc[:3].mean() + 0.05, "harmful-answer NLL must rise"
    assert df["mismatch_nll"].iloc[-3:].mean() < df["mismatch_nll"].iloc[:3].mean(), "mismatch NLL must fall"
    assert df["kl"].max() < 1.0, "KL must stay bounded"


def test_sft_lowers_the_refusal_nll_and_npo_raises_the_harmful_nll(micro_data, tmp_path):
    vlm, data = micro_data
    methods.train(vlm, data, cfg("text_sft", steps=10, lr=1e-2), tmp_path / "sft")
    methods.train(vlm, data, cfg("npo", steps=10, lr=1e-2), tmp_path / "npo")
    sft, npo = _losses(tmp_path / "sft"), _losses(tmp_path / "npo")
    assert sft["forget_nll"].iloc[-1] < sft["forget_nll"].iloc[0] - 0.5
    assert npo["forget_nll"].iloc[-1] > npo["forget_nll"].iloc[0]


def test_stop_rule_ends_ascent_early(micro_data, tmp_path):
    vlm, data = micro_data
    s = methods.train(vlm, data, cfg(steps=8, max_forget_nll=1.0), tmp_path / "stop")
    assert s["steps_done"] == 1 and "max_forget_nll" in s["stopped_by"]


def test_multimodal_methods_show_forget_prompts_as_images(micro_data):
    vlm, data = micro_data
    plan = methods.schedule(cfg("multimodal_ga"), data)[0]
    images = methods.ImageCache(vlm)
    mm = methods.step_rows(vlm, methods.METHODS["multimodal_ga"], data, plan, images)
    text = methods.step_rows(vlm, methods.METHODS["textual_ga"], data, plan, images)
    assert all(img is not None for _, img, _ in mm["forget"] + mm["mismatch"])
    assert all(img is None for _, img, _ in text["forget"] + mm["normal"])
    assert [a for *_, a in mm["forget"]] == [a for *_, a in text["forget"]]  # same answers, other form
    assert "pixel_values" in training.encode_rows(vlm, mm["forget"])
    sft = methods.step_rows(vlm, methods.METHODS["mm_sft"], data, plan, images)
    assert {a for *_, a in sft["forget"]} == {methods.REFUSAL} and not sft["mismatch"]


def test_lora_adapts_the_language_model_only(micro_data):
    vlm, _ = micro_data
    model, trainable, _ = methods.wrap_model(vlm, cfg(lora_targets=("q_proj", "v_proj")))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".language_model." in n for n in names), names[:3]
    vlm.model = model.unload()
    assert not any("lora" in n for n, _ in vlm.model.named_parameters())


def test_full_finetuning_trains_the_llm_against_a_frozen_copy(micro_data, tmp_path):
    vlm, data = micro_data
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    try:
        s = methods.train(vlm, data, cfg(steps=3, lora=False, curve_points=2), tmp_path / "full")
        after = dict(vlm.model.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
        assert changed and all(".language_model." in n or n.startswith("lm_head") for n in changed)
        assert _losses(tmp_path / "full")["kl"].iloc[-1] > 0 and (tmp_path / "full" / "llm.safetensors").is_file()
        assert s["steps_done"] == 3 and "curve/step-0001/llm.safetensors" in s["files"]  # the LLM's weights at step 1
    finally:
        with torch.no_grad():
            for n, p in vlm.model.named_parameters():
                p.copy_(before[n])


def test_adapter_applied_changes_outputs_and_restores_the_base(micro_data, tmp_path):
    from tu_lib.models.generate import generate

    vlm, data = micro_data
    methods.train(vlm, data, cfg(steps=4, lr=5e-2), tmp_path / "m")
    texts = [vlm.chat("Placeholder question?", False)]
    base = generate(vlm.model, vlm.processor, texts, max_new_tokens=8)
    with models.adapter_applied(vlm, tmp_path / "m"):
        tuned = generate(vlm.model, vlm.processor, texts, max_new_tokens=8)
    assert generate(vlm.model, vlm.processor, texts, max_new_tokens=8) == base
    assert tuned != base


@pytest.mark.parametrize("kw, message", [
    ({"methods": ["textual_ga", "unlearn_everything"]}, "unknown method(s) ['unlearn_everything']"),
    ({"methods": "textual_ga,textual_ga"}, "names a method twice"),
    ({"lr": 0.0}, "lr=0.0 must be > 0"),
    ({"lr": -1e-4}, "must be > 0"),
    ({"steps": 0}, "steps=0 must be > 0"),
    ({"preset": "gpt-5"}, "Unknown model preset 'gpt-5'"),
    ({"lora_targets": ["q_proj", "not a module"]}, "module names"),
    ({"lora_targets": "q_proj,qproj"}, "names ['qproj'], which are not decoder-layer linears"),
    ({"stepz": 3}, "did you mean 'steps'"),
])
def test_bad_parameters_are_rejected(kw, message):
    with pytest.raises(ParameterError) as err:
        methods.resolve_params({"profile": "smoke", **kw})
    assert message in str(err.value)


def test_comma_separated_lists_are_accepted():
    P = methods.resolve_params({"profile": "smoke", "methods": "textual_ga, mm_sft", "lora_targets": "q_proj,v_proj"})
    assert P["methods"] == ["textual_ga", "mm_sft"] and P["lora_targets"] == ["q_proj", "v_proj"]


def test_train_rejects_bad_config_before_loading_anything(micro_data, tmp_path):
    vlm, data = micro_data
    for bad in (cfg("forget_all"), cfg(steps=0), cfg(lr=-1.0)):
        with pytest.raises(ParameterError):
            methods.train(vlm, data, bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ParameterError, match="lora_first_layer"):
        methods.train(vlm, data, cfg(lora_first_layer=7), tmp_path / "bad")


def test_notebook_stops_on_a_bad_method_before_any_training(tmp_path):
    stops_early(NB, tmp_path, "unknown method(s) ['textual_gaa']", 0, methods="textual_gaa")


def test_notebook_stops_when_stage01_has_not_run(tmp_path):
    stops_early(NB, tmp_path, "run stage 01 first", 0, data_dir=str(tmp_path / "nowhere"))


def test_notebook_stops_on_a_preset_without_a_model(tmp_path, stage01, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TU_MODEL_DIR", str(tmp_path / "no_models"))
    # forget rows with answers, as stage 01 writes them from PKU-SafeRLHF (without, load_sets stops even earlier:
    # test_paper_presets_need_forget_answers_from_stage01), so the notebook gets as far as the missing model
    data = tmp_path / "with_answers"
    shutil.copytree(stage01, data)
    write_jsonl(data / "sets" / "forget.jsonl", [dict(r, answer="A placeholder answer.")
                                                 for r in read_jsonl(stage01 / "sets" / "forget.jsonl")])
    stops_early(NB, tmp_path, "llava-hf/llava-1.5-7b-hf", 1, preset="llava-1.5-7b", data_dir=str(data))


def test_adapter_applied_needs_the_bare_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    vlm = models.load_vlm("micro")
    vlm.model = get_peft_model(vlm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TuError, match="already carries a peft adapter"):
        with models.adapter_applied(vlm, tmp_path):
            pass


def test_run_identity_includes_the_model():
    data = methods.UnlearnData(forget=[{"prompt": "p", "answer": "a"}], normal=[{"prompt": "q", "answer": "b"}],
                         mismatch_answers=["b"])
    run = cfg(steps=2, lr=1e-3, batch_size=1)
    assert run.key(data, "llava-1.5-7b") != run.key(data, "llava-1.5-13b")  # same folder, other model: no reuse
    assert run.key(data, "organism") == run.key(methods.UnlearnData(**vars(data)), "organism")  # equal inputs, one key
    other_data = methods.UnlearnData(forget=[{"prompt": "p", "answer": "c"}], normal=data.normal, mismatch_answers=["b"])
    assert run.key(other_data, "organism") != run.key(data, "organism")
    assert cfg(steps=2, lr=2e-3, batch_size=1).key(data, "organism") != run.key(data, "organism")
    other_pool = methods.UnlearnData(forget=data.forget, normal=data.normal, mismatch_answers=["b", "d"])
    assert run.key(other_pool, "organism") != run.key(data, "organism")


def test_more_processes_than_rows_per_step_is_refused_before_training(monkeypatch, tmp_path):
    import accelerate

    class ThreeProcesses:
        num_processes, process_index, is_main_process = 3, 0, True

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", ThreeProcesses)
    data = methods.UnlearnData(forget=[{"prompt": "p", "answer": "a"}], normal=[{"prompt": "q", "answer": "b"}],
                               mismatch_answers=["b"])
    with pytest.raises(ParameterError, match="num_processes <= 2"):
        methods.train(None, data, cfg(steps=2, lr=1e-3, batch_size=2), tmp_path)  # no model is touched: the check comes first
    assert not any(tmp_path.iterdir())
