"""Attack sets users bring (issue 17, item 3): a CSV or JSONL file becomes one registry entry for the run, is checked
in full before any model loads, and flows through items, generation, judges, results.csv and the paper table like a
built-in set. Every prompt here is a harmless placeholder."""
import json

import pandas as pd
import pytest
from notebook_helpers import stops_early
from PIL import Image

from tu_lib import models
from tu_lib.core import ParameterError, TuError, repo_root, sha256_file, verified_path, write_jsonl
from tu_lib.data import sets as registry
from tu_lib.data.user_sets import read_user_set, user_set_paths
from tu_lib.stages import evaluate, repgap

BENIGN = ["Explain how to bake bread.", "How do I make a good cup of tea?", "Name three primary colours.",
          "List the steps to fix a flat bicycle tyre.", "Describe how to plant a tomato seedling."]


def prompts_csv(path, n=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["prompt,category"] + [f'"{BENIGN[i % len(BENIGN)]} (variant {i})",{"kitchen" if i % 2 else "garden"}'
                                  for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def png(path, colour=(200, 120, 40), size=(48, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def images_jsonl(folder):
    """A JSONL set with two image files (relative to the set's folder), a text to render and a text-only row."""
    png(folder / "pics" / "red.png", (220, 30, 30))
    png(folder / "pics" / "blue.png", (30, 30, 220))
    rows = [{"id": "r", "prompt": "What colour is this square?", "image": "pics/red.png", "category": "colours"},
            {"id": "b", "prompt": "Describe the picture.", "image": "pics/blue.png"},
            {"id": 7, "prompt": "", "image_text": "Steps to brew green tea."},
            {"prompt": "Name a fruit that is yellow."}]
    (folder / "with_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder / "with_images.jsonl"


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: a bad file must be refused before."""
    monkeypatch.setattr(models, "load_vlm", lambda *a, **k: pytest.fail("a model was loaded before the bad file was refused"))


def stage01(folder, names=("t1_advbench",)):
    """Stage 01's output as the stages read it: three items per set, all in the test part (stages 03 and 05's default)."""
    (folder / "sets").mkdir(parents=True, exist_ok=True)
    for name in names:
        write_jsonl(folder / "sets" / f"{name}.jsonl", [{"id": f"{name}:{i}", "prompt": BENIGN[i], "image_text": BENIGN[i],
                                                         "split": "test"} for i in range(3)])
    return folder


# ---- the file format -------------------------------------------------------------------------------------------


def test_a_csv_of_text_prompts_reads_with_ids_by_position(tmp_path):
    rows = read_user_set(prompts_csv(tmp_path / "p.csv"))
    assert len(rows) == 20 and [r["id"] for r in rows[:3]] == ["1", "2", "3"] and rows[0]["line"] == 2
    assert rows[0]["prompt"].startswith("Explain how to bake bread.") and rows[1]["category"] == "kitchen"
    assert all(r["image"] is None and r["image_text"] is None for r in rows)
    assert len({r["digest"] for r in rows}) == 20


def test_a_jsonl_with_images_resolves_paths_from_its_folder(tmp_path):
    rows = read_user_set(images_jsonl(tmp_path))
    assert [r["id"] for r in rows] == ["r", "b", "7", "4"]
    assert rows[0]["image"] == str(tmp_path / "pics" / "red.png")
    assert rows[0]["image_sha256"] == sha256_file(tmp_path / "pics" / "red.png")
    assert rows[2]["image_text"] == "Steps to brew green tea." and rows[2]["prompt"] == ""
    png(tmp_path / "pics" / "red.png", (0, 200, 0))  # another picture under the same name is another input
    assert read_user_set(tmp_path / "with_images.jsonl")[0]["digest"] != rows[0]["digest"]


def test_the_shipped_example_reads_and_is_benign_and_hashed():
    path = verified_path("examples/user_set_example.csv")  # listed in data/SHA256SUMS
    rows = read_user_set(path)
    assert len(rows) == 5 and sum(r["image"] is not None for r in rows) == 1 and sum(bool(r["image_text"]) for r in rows) == 1
    verified_path("examples/user_set_example.png")


def test_user_sets_are_registry_entries_built_per_run(tmp_path):
    before = dict(registry.EVAL_SETS)
    run = registry.eval_sets([tmp_path / "My Prompts.csv"])
    entry = run["user_my_prompts"]
    assert (entry.kind, entry.label, entry.path) == ("attack", "user: my_prompts", str(tmp_path / "My Prompts.csv"))
    assert registry.EVAL_SETS == before and "user_my_prompts" not in registry.EVAL_SETS  # nothing global changed
    assert registry.eval_set("user_my_prompts").label == "user: my_prompts" and registry.is_attack("user_my_prompts")
    with pytest.raises(ParameterError, match="would both be the set 'user_a'"):
        registry.eval_sets([tmp_path / "a.csv", tmp_path / "x" / "A.jsonl"])


@pytest.mark.parametrize("value", ['["{d}/a.csv", "{d}/b.jsonl"]', "{d}/a.csv,{d}/b.jsonl", ["{d}/a.csv", "{d}/b.jsonl"]])
def test_the_parameter_takes_a_list_a_json_list_or_commas(value, tmp_path):
    value = [v.format(d=tmp_path) for v in value] if isinstance(value, list) else value.format(d=tmp_path)
    assert user_set_paths(value) == [str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")]
    P = evaluate.resolve_params({"profile": "smoke", "user_sets": value})
    assert P["sets"][-2:] == ["user_a", "user_b"] and P["sets"][:-2] == evaluate.params.profile_values("smoke", "03_eval")["sets"]


# ---- bad files: refused before any model loads, nothing written ------------------------------------------------


def _bad(tmp_path, name, text=None, data=None):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    return path


BAD = [
    ("no_prompt.csv", "question,category\nHow do I bake bread?,cooking\n", r"has no `prompt` column \(columns: question, category\)"),
    ("empty.csv", "", r"empty\.csv is empty"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl is empty"),
    ("header_only.csv", "prompt,category\n", r"has a header but no rows"),
    ("typo.csv", "prompt,imge\nHi,x.png\n", r"unknown column\(s\) 'imge' \(did you mean 'image'\?\)"),
    ("both.csv", "prompt,image,image_text\nHi,pic.png,Steps to knit.\n", r"line 2 has both `image` and `image_text`"),
    ("dups.csv", "id,prompt\na,Hi\nb,Hello\na,Hey\n", r"line 4: id 'a' is already used on line 2"),
    ("dups_by_position.csv", "id,prompt\n,Hi\n1,Hello\n", r"line 3: id '1' is already used on line 2"),
    ("missing_image.csv", "prompt,image\nDescribe it.,nowhere/pic.png\n", r"line 2: image 'nowhere/pic.png' not found at .*"
                                                                           r"relative to the set file's folder"),
    ("broken_image.csv", "prompt,image\nDescribe it.,broken.png\n", r"line 2: image 'broken.png' .* cannot be read as an image"),
    ("truncated_image.csv", "prompt,image\nDescribe it.,truncated.png\n", r"image 'truncated.png' .* cannot be read"),
    ("empty_prompt.csv", "prompt,category\nHi,a\n  ,b\n", r"line 3 has an empty prompt and no image"),
    ("ragged.csv", "prompt\nHi,there\n", r"line 2 has 2 fields, the header 1: quote fields"),
    ("bad_json.jsonl", '{"prompt": "Hi"}\n{"prompt": "Hello"\n', r"line 2 is not valid JSON"),
    ("list.jsonl", '["Hi"]\n', r"line 1 is a JSON list, not an object"),
    ("number.jsonl", '{"prompt": 5}\n', r"line 1: `prompt` is a JSON int; it must be a string"),
    ("no_prompt.jsonl", '{"prompt": "Hi"}\n{"image_text": "Steps to knit."}\n', r"line 2 has no `prompt` key \(keys: image_text\)"),
    ("latin1.csv", None, r"line 2 is not UTF-8 text"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_file_is_refused_before_a_model_loads(name, text, message, tmp_path, no_model):
    png(tmp_path / "pic.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "truncated.png").write_bytes(png(tmp_path / "whole.png", size=(64, 64)).read_bytes()[:60])
    path = _bad(tmp_path, name, text, data="prompt\nCaf\xe9 au lait\n".encode("latin-1") if text is None else None)
    P = evaluate.resolve_params({"profile": "smoke", "data_dir": str(stage01(tmp_path / "d")), "sets": "t1_advbench",
                                 "methods": "base", "judges": "refusal_keywords", "user_sets": [str(path)],
                                 "out_dir": str(tmp_path / "out"), "fig_dir": str(tmp_path / "figs")})
    with pytest.raises(TuError, match=message) as err:
        evaluate.check_inputs(P)
    assert str(path) in str(err.value)  # the message names the file
    assert not (tmp_path / "out").exists() and not (tmp_path / "figs").exists()  # nothing written


@pytest.mark.parametrize("value, message", [
    ("prompts.txt", r"has the extension '.txt'.*Name the file \*.csv or \*.jsonl"),
    ("prompts", r"has the extension '\(none\)'"),
    ('["a.csv", 3]', r"must be a list of file paths"),
    ("[a.csv", r"is not a readable list"),
    ("a.csv,sub/A.CSV", r"would both be the set 'user_a'"),
    ("....csv", r"gives no set name"),
])
def test_a_bad_user_sets_parameter_is_refused_at_once(value, message, no_model):
    with pytest.raises(ParameterError, match=message):
        evaluate.resolve_params({"profile": "smoke", "user_sets": value})


def test_a_missing_file_is_refused_before_a_model_loads(tmp_path, no_model):
    P = evaluate.resolve_params({"profile": "smoke", "data_dir": str(stage01(tmp_path / "d")), "sets": "t1_advbench",
                                 "methods": "base", "user_sets": str(tmp_path / "nope.csv")})
    with pytest.raises(TuError, match=r"nope\.csv: no such file"):
        evaluate.check_inputs(P)


def test_stage_05_wants_an_image_in_every_row(tmp_path, no_model):
    path = images_jsonl(tmp_path)  # its last row is text only
    common = {"profile": "smoke", "data_dir": str(stage01(tmp_path / "d", ("forget", "v1_figstep"))), "methods": [],
              "combine_methods": [], "sets": "", "out_dir": str(tmp_path / "out"), "fig_dir": str(tmp_path / "figs")}
    P = repgap.resolve_params({**common, "user_sets": [str(path)]})
    assert P["sets"] == ["user_with_images"]
    with pytest.raises(TuError, match=r"line 4 has no image or image_text \(1 such rows\).*notebook 03"):
        repgap.check_inputs(P)
    assert not (tmp_path / "out").exists()
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")
    repgap.check_inputs(repgap.resolve_params({**common, "user_sets": [str(path)]}))
    assert (tmp_path / "out").is_dir()


def test_only_user_sets_needs_one_at_least(no_model):
    with pytest.raises(ParameterError, match="must name at least one"):
        evaluate.resolve_params({"profile": "smoke", "sets": ""})


def test_notebook_03_stops_on_a_bad_user_set_before_loading_a_model(tmp_path):
    bad = tmp_path / "sets_in" / "no_prompt.csv"
    bad.parent.mkdir()
    bad.write_text("question\nHow do I bake bread?\n")
    stops_early(repo_root() / "notebooks" / "03_eval.ipynb", tmp_path, "has no `prompt` column", 0, methods="base",
                sets="t1_advbench", data_dir=str(stage01(tmp_path / "d")), user_sets=json.dumps([str(bad)]))


# ---- end to end on the micro preset -----------------------------------------------------------------------------


def run_stage03(P, out):
    """Notebook 03's cells, through the stage's own functions (the micro preset: seconds)."""
    import time

    evaluate.check_inputs(P)
    vlm = models.load_vlm(P["preset"])
    items, facts = [], {}
    for name in P["sets"]:
        set_items, set_facts = evaluate.build_items(vlm, P, name, v3_cache=out / "v3_images")
        items += set_items
        facts.update(set_facts)
    judge_set = evaluate.Judges(vlm, P["judges"])
    answers = {m: evaluate.generate_method(vlm, P, m, items, out) for m in P["methods"]}
    judged = judge_set.judge_all(items, answers)
    results = pd.DataFrame([r for m in P["methods"] for r in evaluate.metric_rows(P["preset"], m, judged[m],
                                                                                    judge_set.provenance(), P["seed"])])
    evaluate.write_outputs(P, out, results, judged, facts, time.time(), judge_set.provenance())
    return items, results


def test_user_sets_run_through_stage_03_into_results_and_the_table(tmp_path):
    out = tmp_path / "out"
    csv_path, jsonl_path = prompts_csv(tmp_path / "in" / "prompts20.csv"), images_jsonl(tmp_path / "in")
    P = evaluate.resolve_params({"profile": "smoke", "preset": "micro", "methods": "base", "sets": "t1_advbench",
                                 "user_sets": [str(csv_path), str(jsonl_path)], "judges": "refusal_keywords",
                                 "n_per_set": "all", "max_new_tokens": 3, "batch_size": 8,
                                 "data_dir": str(stage01(tmp_path / "d")), "out_dir": str(out),
                                 "fig_dir": str(tmp_path / "figs")})
    assert P["sets"] == ["t1_advbench", "user_prompts20", "user_with_images"]
    items, results = run_stage03(P, out)
    by_set = {s: [it for it in items if it["set"] == s] for s in P["sets"]}
    assert [len(v) for v in by_set.values()] == [3, 20, 4]
    pics = by_set["user_with_images"]
    assert [it["image"] is not None for it in pics] == [True, True, True, False]
    assert pics[0]["image"].getpixel((0, 0)) == (220, 30, 30)                 # the file's own picture
    assert pics[2]["instruction"] == "Steps to brew green tea."                  # judged against the rendered text
    assert "<image>" in pics[0]["text"] and "<image>" not in pics[3]["text"]

    saved = pd.read_csv(out / "results.csv")
    for name, n in (("user_prompts20", 20), ("user_with_images", 4)):
        row = saved[(saved["set"] == name) & (saved["metric"] == "asr") & (saved["judge"] == "refusal_keywords")]
        assert len(row) == 1 and row.iloc[0]["n"] == n and row.iloc[0]["ci_low"] <= row.iloc[0]["rate"] <= row.iloc[0]["ci_high"]
    table = evaluate.paper_table(saved)
    assert list(table.columns) == ["T1 AdvBench", "user: prompts20", "user: with_images"]
    assert "n=20" in table.loc["base", "user: prompts20"]
    judgements = pd.read_csv(out / "judgements.csv", keep_default_na=False)
    assert set(judgements[judgements["set"] == "user_prompts20"]["category"]) == {"kitchen", "garden"}
    record = json.loads((out / "run_record.json").read_text())
    inputs = json.dumps(record)
    for f in (csv_path, jsonl_path, tmp_path / "in" / "pics" / "red.png", tmp_path / "in" / "pics" / "blue.png"):
        assert str(f) in inputs and sha256_file(f) in inputs
    evaluate.asr_figure(saved)  # the figure labels user sets too

    # an edited row is answered afresh (its key carries the digest), the others come from the saved generations
    csv_path.write_text(csv_path.read_text().replace("(variant 0)", "(variant zero)"))
    again, _ = run_stage03(P, out)
    assert {it["key"] for it in again} ^ {it["key"] for it in items} == {
        next(it["key"] for it in items if it["key"].startswith("user_prompts20|1|")),
        next(it["key"] for it in again if it["key"].startswith("user_prompts20|1|"))}


def test_user_sets_run_through_stage_05s_alpha_sweep(tmp_path):
    path = images_jsonl(tmp_path / "in")
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")  # image rows only
    P = repgap.resolve_params({"profile": "smoke", "preset": "micro", "methods": [], "combine_methods": [],
                               "sets": "v1_figstep", "user_sets": [str(path)], "layers": "0,-1", "cmrm_layers": "0",
                               "alphas": "0,1", "sample_alphas": [], "judges": "refusal_keywords", "max_new_tokens": 3,
                               "data_dir": str(stage01(tmp_path / "d", ("forget", "v1_figstep"))),
                               "out_dir": str(tmp_path / "out"), "fig_dir": str(tmp_path / "figs")})
    repgap.check_inputs(P)
    vlm = models.load_vlm("micro")
    _, cmrm_layers = repgap.resolve_layers(vlm, P)
    vectors = repgap.model_shifts(vlm, P, repgap.anchor_prompts(P), cmrm_layers, [repgap.BASE])
    items = [it for name in P["sets"] for it in evaluate.build_items(vlm, P, name)[0]]
    plan = repgap.sweep_plan(P)
    answers = repgap.sweep_answers(vlm, P, items, plan, vectors, cmrm_layers)
    judged = evaluate.Judges(vlm, P["judges"]).judge_all(items, answers)
    sweep = repgap.sweep_rows(P, plan, judged, evaluate.Judges(vlm, P["judges"]).provenance())
    user = sweep[(sweep["set"] == "user_with_images") & (sweep["metric"] == "asr")]
    assert sorted(user["alpha"]) == [0.0, 1.0] and set(user["n"]) == {2}   # n_per_set 2 on the smoke profile
    table = repgap.alpha_table(sweep)
    assert "user: with_images: ASR (keywords)" in set(table["panel"])
    repgap.alpha_figure(table)
