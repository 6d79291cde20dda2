"""Training curves (issue 19, evaluation.curves): every checkpoint of a real micro run scored on validation items only,
the pooled rates derived as stage 03 derives them, the cost at matched safety read off hand-made curves with known
answers, the figures with their CSVs, and the selection rule's picks turned into the checkpoints stage 03 evaluates."""
import numpy as np
import pandas as pd
import pytest

from tu_lib import methods, models
from tu_lib.core import ParameterError, TuError, read_jsonl, write_jsonl
from tu_lib.core.plots import save_figure
from tu_lib.evaluation import curves
from tu_lib.stages import evaluate, unlearn

CURVE_SETS = "t1_advbench,v1_figstep,xstest_safe,utility_reading,utility_truthfulqa"
CURVE_JUDGES = "refusal_keywords,on_topic,fluency"


# ---- the cost at matched safety, on hand-made curves ---------------------------------------------------------------


def hand_curve(method: str, points: list[tuple[int, float, float]], gflop_per_step: float = np.nan) -> pd.DataFrame:
    """(step, image-set compliance, cumulative seconds) rows of one method, with 95% CI columns ±5 points, n 20."""
    rows = [{"method": method, "step": s, "compliance_image": y, "compliance_image_n": 20,
             "compliance_image_ci_low": max(0.0, y - 0.05), "compliance_image_ci_high": min(1.0, y + 0.05),
             "compliance_text": y / 2, "compliance_text_n": 20, "compliance_text_ci_low": max(0.0, y / 2 - 0.05),
             "compliance_text_ci_high": y / 2 + 0.05, "benign_reading": 0.6 - s / 100, "seconds": c,
             "gflop": 0.0 if s == 0 else gflop_per_step * s} for s, y, c in points]
    return pd.DataFrame(rows)


# multimodal: slow and steady, 10 s a step; textual: 5x cheaper per step, but stalls at 35%
MM = hand_curve("multimodal_ga", [(0, 0.60, 0), (1, 0.50, 10), (2, 0.40, 20), (4, 0.30, 40), (8, 0.20, 80)], 50.0)
TX = hand_curve("textual_ga", [(0, 0.60, 0), (1, 0.55, 2), (2, 0.45, 4), (4, 0.35, 8), (8, 0.35, 16)])
BOTH = pd.concat([MM, TX], ignore_index=True)


def test_first_reach_interpolates_between_the_bracketing_checkpoints():
    r = curves.first_reach(BOTH, "multimodal_ga", 0.45)
    assert r["cost"] == pytest.approx(15.0)  # half-way from 50% (10 s) to 40% (20 s)
    assert r["how"] == "interpolated linearly between steps 1 and 2" and r["reason"] == ""
    assert curves.first_reach(BOTH, "textual_ga", 0.45)["cost"] == pytest.approx(4.0)  # exactly at step 2
    assert curves.first_reach(BOTH, "multimodal_ga", 0.45, cost="gflop")["cost"] == pytest.approx(75.0)  # 1.5 steps x 50
    # the first crossing counts, even when the curve climbs back above the level later
    dip = hand_curve("npo", [(0, 0.60, 0), (2, 0.30, 30), (4, 0.50, 60)])
    assert curves.first_reach(dip, "npo", 0.40)["cost"] == pytest.approx(20.0)  # 2/3 of the way to step 2
    never = curves.first_reach(BOTH, "textual_ga", 0.30)
    assert np.isnan(never["cost"]) and never["reason"] == "textual_ga never reaches 30.0% (its lowest is 35.0%, at step 4)"
    assert curves.first_reach(BOTH, "textual_ga", 0.65) == {
        "cost": 0.0, "how": "the base model (step 0) is already at the level", "reason": ""}


def test_matched_cost_ratio_at_given_and_default_levels():
    table = curves.matched_cost_ratio(BOTH, "multimodal_ga", "textual_ga", levels=[0.45, 0.30, 0.65]).set_index("level")
    assert table.loc[0.45, "ratio"] == pytest.approx(15.0 / 4.0) and table.loc[0.45, "reason"] == ""
    assert table.loc[0.45, "how_b"] == "interpolated linearly between steps 1 and 2"
    assert np.isnan(table.loc[0.30, "ratio"]) and table.loc[0.30, "cost_a"] == pytest.approx(40.0)
    assert "textual_ga never reaches 30.0%" in table.loc[0.30, "reason"]
    assert np.isnan(table.loc[0.65, "ratio"]) and "at no cost" in table.loc[0.65, "reason"]
    # default levels: 1/4, 1/2 and 3/4 of the way from the base's 60% to the lowest either reaches (20%)
    assert curves.safety_levels(BOTH, ["multimodal_ga", "textual_ga"]) == pytest.approx([0.50, 0.40, 0.30])
    default = curves.matched_cost_ratio(BOTH, "multimodal_ga", "textual_ga")
    assert default["level"].tolist() == pytest.approx([0.50, 0.40, 0.30])
    assert default["ratio"].iloc[0] == pytest.approx(10.0 / 3.0)  # 10 s at step 1 vs half-way 2 s -> 4 s
    assert default["ratio"].iloc[1] == pytest.approx(20.0 / 6.0)  # step 2 vs half-way from 4 s to 8 s
    # textual_ga has no FLOP count: the ratio in GFLOP is refused with the reason, not computed from a NaN
    flops = curves.matched_cost_ratio(BOTH, "multimodal_ga", "textual_ga", levels=[0.45], cost="gflop")
    assert np.isnan(flops["ratio"].iloc[0]) and "textual_ga has no gflop at step 1 or 2" in flops["reason"].iloc[0]


@pytest.mark.parametrize("kw, message", [
    ({"method_a": "npo"}, r"no method 'npo'"),
    ({"safety": "compliance_audio"}, r"lacks column\(s\) \['compliance_audio'\]"),
])
def test_matched_cost_ratio_refuses_what_it_cannot_read(kw, message):
    args = {"method_a": "multimodal_ga", "method_b": "textual_ga", **kw}
    with pytest.raises(TuError, match=message):
        curves.matched_cost_ratio(BOTH, args.pop("method_a"), args.pop("method_b"), levels=[0.4], **args)
    with pytest.raises(TuError, match="does not start at step 0"):
        curves.first_reach(BOTH[BOTH["step"] > 0], "textual_ga", 0.4)


def test_step_gflop_takes_stage04s_median_per_method():
    measured = pd.DataFrame({"method": ["a", "a", "a", "b"], "step": [1, 2, 3, 1], "gflop": [1.0, 9.0, 2.0, 5.0]})
    assert curves.step_gflop(measured) == {"a": 2.0, "b": 5.0}
    assert curves.step_gflop(None) == {}
    with pytest.raises(TuError, match=r"lack column\(s\) \['gflop'\]"):
        curves.step_gflop(measured.drop(columns="gflop"))


# ---- the figures ---------------------------------------------------------------------------------------------------


def test_figures_draw_each_method_through_its_checkpoints_and_save_their_rows(tmp_path):
    fig = evaluate.curve_figure(BOTH)
    image_panel, text_panel = fig.axes[:2]
    for ax, column in ((image_panel, "compliance_image"), (text_panel, "compliance_text")):
        drawn = {tuple(np.round(np.asarray(line.get_ydata(), float), 6)) for line in ax.get_lines()}
        for method, rows in BOTH.groupby("method"):
            assert tuple(np.round(rows.sort_values("step")[column] * 100, 6)) in drawn, (column, method)
    assert "±5 points" in image_panel.get_title() and "n=20" in image_panel.get_title()
    paths = save_figure(fig, BOTH, "03_eval_curve", tmp_path)
    saved = pd.read_csv(paths["csv"])
    assert len(saved) == len(BOTH) and set(zip(saved["method"], saved["step"])) == set(zip(BOTH["method"], BOTH["step"]))

    cost = evaluate.cost_figure(BOTH, "seconds")
    xs = {tuple(np.asarray(line.get_xdata(), float)) for line in cost.axes[0].get_lines()}
    assert tuple(MM["seconds"].astype(float)) in xs and tuple(TX["seconds"].astype(float)) in xs
    saved = pd.read_csv(save_figure(cost, BOTH, "03_eval_curve_cost", tmp_path)["csv"])
    assert saved["seconds"].tolist() == BOTH["seconds"].tolist()
    with pytest.raises(TuError, match="has no gflop"):
        evaluate.cost_figure(BOTH.assign(gflop=np.where(BOTH["step"] > 0, np.nan, 0.0)), "gflop")
    with pytest.raises(ParameterError, match="cost='tokens' must be one of"):
        evaluate.cost_figure(BOTH, "tokens")


# ---- pooled rates, as stage 03 derives them ------------------------------------------------------------------------


def test_checkpoint_scores_pool_the_sets_of_each_modality():
    judged = pd.DataFrame({
        "set": ["t1_advbench"] * 2 + ["t2_harmbench"] * 2 + ["v1_figstep"] * 3 + ["xstest_safe"] * 2 + ["utility_reading"] * 2,
        "refused": [False, True, False, False, False, False, True, True, False, False, True],
        "on_topic": [True, True, False, True, True, False, True, False, True, True, True],
        "degenerate": [False, False, True, False, False, False, False, False, False, True, False],
    })
    s = curves.checkpoint_scores(judged, seed=0)
    # compliance = not refused AND on topic, over T1 + T2 pooled: items 0 and 3 of 4
    assert (s["compliance_text"], s["compliance_text_n"]) == (0.5, 4)
    assert (s["compliance_image"], s["compliance_image_n"]) == (pytest.approx(1 / 3), 3)
    assert (s["keyword_asr_text"], s["keyword_asr_image"]) == (0.75, pytest.approx(2 / 3))  # not refused alone
    assert (s["over_refusal"], s["benign_reading"]) == (0.5, 0.5)
    assert (s["degenerate_share"], s["degenerate_share_n"]) == (pytest.approx(2 / 11), 11)  # over every answer
    assert s["compliance_text_ci_low"] <= 0.5 <= s["compliance_text_ci_high"]
    none = curves.checkpoint_scores(judged[judged["set"] != "v1_figstep"], seed=0)
    assert none["compliance_image_n"] == 0 and np.isnan(none["compliance_image"])


@pytest.mark.parametrize("kw, message", [
    ({"methods": "base"}, "names no unlearning method"),
    ({"judges": "refusal_keywords,on_topic"}, r"lacks \['fluency'\]: a curve needs fluency for the degenerate share"),
    ({"sets": "t1_advbench,v1_figstep"}, "lacks utility_reading"),
    ({"sets": "xstest_safe,utility_reading"}, "holds no built-in attack set"),
])
def test_a_curve_that_cannot_be_scored_is_refused_before_any_model_work(kw, message):
    P = evaluate.resolve_params({"profile": "smoke", "preset": "micro", "methods": "base,textual_ga",
                                 "sets": CURVE_SETS, "judges": CURVE_JUDGES, **kw})
    with pytest.raises(ParameterError, match=message):
        evaluate.score_curve(None, P, None, "unused")  # no model, no judges: refused before either is touched


# ---- a real micro curve --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Stage 01's smoke sets, two micro methods trained 4 steps with curve points (kept: steps 1, 2 and the last, 4),
    and their curve scored on 2 validation items per set; the stage-03 parameters ask for the test split, which the
    curve must ignore."""
    from tu_lib.core import params
    from tu_lib.data import curation as curate

    root = tmp_path_factory.mktemp("curve")
    cur = curate.build(params.resolve(curate.SPEC, {"profile": "smoke"}), {})
    (root / "01" / "sets").mkdir(parents=True)
    for name, df in cur.sets.items():
        write_jsonl(root / "01" / "sets" / f"{name}.jsonl", df.to_dict("records"))
    vlm = models.load_vlm("micro")
    data = unlearn.prepare_data(vlm, {"data_dir": str(root / "01"), "n_forget": 4, "answer_tokens": 4,
                                      "out_dir": str(root / "02"), "preset": "micro"})
    for method in ("textual_ga", "multimodal_ga"):
        methods.train(vlm, data, methods.TrainConfig(
            method=method, steps=4, curve_points=3, lr=5e-3, batch_size=2, lora_r=4, lora_alpha=8, checkpoint_every=2,
            lora_targets=("q_proj", "v_proj"), lora_first_layer=0), root / "02" / method)
    P = evaluate.resolve_params({"profile": "smoke", "preset": "micro", "methods": "base,textual_ga,multimodal_ga",
                                 "sets": CURVE_SETS, "judges": CURVE_JUDGES, "n_per_set": 2, "max_new_tokens": 3,
                                 "batch_size": 8, "split": "test", "data_dir": str(root / "01"),
                                 "unlearn_dir": str(root / "02"), "out_dir": str(root / "03")})
    evaluate.check_inputs(P)
    curve = evaluate.score_curve(vlm, P, evaluate.Judges(vlm, P["judges"]), root / "03",
                                 gflop_per_step={"textual_ga": 3.0})
    return vlm, P, root, curve


def test_a_micro_curve_has_one_row_per_method_and_step_with_rates_in_range(scored):
    _, P, root, curve = scored
    assert list(curve.columns) == list(curves.CURVE_COLUMNS)
    assert list(zip(curve["method"], curve["step"])) == [(m, s) for m in ("textual_ga", "multimodal_ga")
                                                         for s in (0, 1, 2, 4)]
    base = curve[curve["step"] == 0].drop(columns=["method", "gflop"])
    assert base.iloc[0].equals(base.iloc[1])  # step 0 is the same base model for both methods
    rates = [c for c in curves.RATES] + [f"{c}_ci_{b}" for c in curves.RATES for b in ("low", "high")]
    assert curve[rates].notna().all().all() and curve[rates].apply(lambda c: c.between(0, 1)).all().all()
    for c in curves.RATES:
        assert (curve[f"{c}_ci_low"] <= curve[c] + 1e-12).all() and (curve[c] <= curve[f"{c}_ci_high"] + 1e-12).all()
    n = curve.iloc[0]
    # 2 items per set: T1 alone is the text pool, V1 the image pool; the fluency judge reads all 4 generated sets
    assert [n[f"{c}_n"] for c in ("compliance_text", "compliance_image", "benign_reading", "over_refusal",
                                  "degenerate_share", "mc1")] == [2, 2, 2, 2, 8, 2]
    ga = curve[curve["method"] == "textual_ga"].set_index("step")
    assert ga.loc[4, "checkpoint"] == str(root / "02" / "textual_ga")
    assert ga.loc[1, "checkpoint"] == str(root / "02" / "textual_ga" / "curve" / "step-0001")
    assert ga.loc[0, "checkpoint"] == "base"
    logged = pd.read_csv(root / "02" / "textual_ga" / "losses.csv")["seconds"]
    assert ga["seconds"].tolist() == pytest.approx([0.0, logged[:1].sum(), logged[:2].sum(), logged.sum()])
    assert ga["gflop"].tolist() == [0.0, 3.0, 6.0, 12.0]
    mm = curve[curve["method"] == "multimodal_ga"]
    assert mm["gflop"].iloc[0] == 0.0 and mm["gflop"].iloc[1:].isna().all()  # stage 04 gave no count for it


def test_the_curve_generates_validation_items_only_once_per_checkpoint(scored):
    vlm, P, root, _ = scored
    files = sorted((root / "03" / "generations" / "micro").glob("*.jsonl"))
    # the base model once, then 3 kept checkpoints of each method, each under its own weights
    assert sorted(f.name.split("-")[0] for f in files) == ["base"] + ["multimodal_ga"] * 3 + ["textual_ga"] * 3
    keys = {r["key"] for f in files for r in read_jsonl(f)}
    parts = {split: {it["key"] for name in P["sets"] if name != "utility_truthfulqa"
                     for it in evaluate.build_items(vlm, {**P, "split": split, "n_per_set": "all"}, name)[0]}
             for split in ("validation", "test")}
    assert keys and keys <= parts["validation"] and not keys & parts["test"]
    assert len(keys) == 8  # 2 items of each of the 4 generated sets


def test_picked_checkpoints_name_the_folder_the_rule_picks(scored):
    _, P, root, curve = scored
    unlearn_dir = root / "02"
    everything = evaluate.picked_checkpoints(curve, {"max_degenerate_share": 1.0}, unlearn_dir)
    assert {m: (p["step"], p["checkpoint"]) for m, p in everything.items()} == {
        m: (4, str(unlearn_dir / m)) for m in ("textual_ga", "multimodal_ga")}
    # benign reading made to fall after step 2 of textual_ga only: the rule keeps step 2, a curve point's folder
    shaped = curve.assign(benign_reading=0.8)
    shaped.loc[(shaped["method"] == "textual_ga") & (shaped["step"] == 4), "benign_reading"] = 0.1
    picks = evaluate.picked_checkpoints(shaped, {"min_benign_reading_vs_base": 0.9}, unlearn_dir)
    assert picks["textual_ga"]["step"] == 2
    assert picks["textual_ga"]["checkpoint"] == str(unlearn_dir / "textual_ga" / "curve" / "step-0002")
    assert "step 4: benign reading 10.0% < 72.0%" in picks["textual_ga"]["reason"]
    assert picks["textual_ga"]["failed"] == {"4": ["benign reading 10.0% < 72.0% (0.9 x base 80.0%)"]}
    assert picks["multimodal_ga"]["step"] == 4
    moved = shaped.copy()
    moved.loc[(moved["method"] == "textual_ga") & (moved["step"] == 2), "step"] = 3  # not a step this run kept
    with pytest.raises(TuError, match=r"textual_ga's curve picks step 3, but its run .* kept steps \[0, 1, 2, 4\]"):
        evaluate.picked_checkpoints(moved, {"min_benign_reading_vs_base": 0.9}, unlearn_dir)


def test_stage03_evaluates_the_pick_a_named_step_or_the_final_weights(scored):
    _, P, root, curve = scored
    unlearn_dir = root / "02"
    shaped = curve.assign(benign_reading=0.8)
    shaped.loc[(shaped["method"] == "textual_ga") & (shaped["step"] >= 2), "benign_reading"] = 0.1
    picks = evaluate.evaluated_checkpoints(shaped, {"min_benign_reading_vs_base": 0.9}, ["base", "textual_ga",
                                           "multimodal_ga"], unlearn_dir)
    assert {m: p["step"] for m, p in picks.items()} == {"textual_ga": 1, "multimodal_ga": 4}
    assert evaluate.evaluated_weights(picks, "textual_ga") == ("textual_ga", unlearn_dir / "textual_ga" / "curve" / "step-0001")
    assert evaluate.evaluated_weights(picks, "base") == ("base", None)
    # a step named by the `checkpoints` parameter wins, and the rule's own pick stays in the reason
    named = evaluate.evaluated_checkpoints(shaped, {"min_benign_reading_vs_base": 0.9}, ["textual_ga"], unlearn_dir,
                                           {"textual_ga": 0})
    assert named["textual_ga"]["step"] == 0 and "the selection rule picked step 1" in named["textual_ga"]["reason"]
    assert evaluate.evaluated_weights(named, "textual_ga") == ("base", None)  # step 0 is the base model's answers
    # no curve: each method's final weights
    final = evaluate.evaluated_checkpoints(None, {"max_degenerate_share": 0.05}, ["textual_ga"], unlearn_dir)
    assert final["textual_ga"]["step"] == 4 and final["textual_ga"]["checkpoint"] == str(unlearn_dir / "textual_ga")


@pytest.mark.parametrize("value, message", [
    ("{textual_ga: [1]}", "must map methods to steps"), ({"textual_ga": -1}, "must map methods to steps"),
    ("textual_ga", "must map methods to steps"), ({"textual_ga": True}, "must map methods to steps")])
def test_a_malformed_checkpoints_parameter_is_refused(value, message):
    with pytest.raises(ParameterError, match=message):
        evaluate.resolve_params({"profile": "smoke", "checkpoints": value})


def test_checkpoints_parameter_from_the_command_line_and_a_step_the_run_never_kept(scored):
    _, P, root, _ = scored
    Q = evaluate.resolve_params({**{k: P[k] for k in ("profile", "preset", "data_dir", "unlearn_dir")},
                                 "methods": "base,textual_ga", "checkpoints": "{textual_ga: 2}", "curve_n_per_set": 0})
    assert Q["checkpoints"] == {"textual_ga": 2}
    evaluate.check_inputs({**Q, "out_dir": ""})
    with pytest.raises(TuError, match=r"checkpoints asks for textual_ga at step 3, but its run .* kept steps \[0, 1, 2, 4\]"):
        evaluate.check_inputs({**Q, "checkpoints": {"textual_ga": 3}, "out_dir": ""})
    with pytest.raises(TuError, match=r"checkpoints names 'npo', which is not an evaluated method"):
        evaluate.check_inputs({**Q, "checkpoints": {"npo": 3}, "out_dir": ""})


def test_stage05_takes_stage03s_picks_and_refuses_picks_of_another_run(scored, tmp_path):
    from tu_lib.core import write_json
    from tu_lib.evaluation.selection import picked_folders

    _, _, root, _ = scored
    unlearn_dir = root / "02"
    write_json(tmp_path / "picks.json", {"checkpoints": {
        "textual_ga": {"step": 2, "checkpoint": str(unlearn_dir / "textual_ga" / "curve" / "step-0002")},
        "multimodal_ga": {"step": 0, "checkpoint": None}}})
    assert picked_folders(tmp_path, unlearn_dir, ["textual_ga", "multimodal_ga", "text_sft"]) == {
        "textual_ga": unlearn_dir / "textual_ga" / "curve" / "step-0002", "multimodal_ga": None,
        "text_sft": unlearn_dir / "text_sft"}
    assert picked_folders(None, unlearn_dir, ["textual_ga"]) == {"textual_ga": unlearn_dir / "textual_ga"}
    with pytest.raises(TuError, match=r"picks textual_ga at .*, outside this stage 02 run"):
        picked_folders(tmp_path, tmp_path / "another02", ["textual_ga"])


def test_costed_curve_takes_stage04s_median_seconds_and_counted_gflop_per_step():
    per_step = pd.DataFrame({"method": ["multimodal_ga", "textual_ga"], "seconds_median": [6.0, 4.0],
                             "gflop_per_step": [700.0, 400.0]})
    costed = curves.costed_curve(BOTH, per_step)
    mm = costed[costed["method"] == "multimodal_ga"]
    assert mm["seconds"].tolist() == [0.0, 6.0, 12.0, 24.0, 48.0] and mm["gflop"].tolist() == [0.0, 700.0, 1400.0, 2800.0, 5600.0]
    assert costed[costed["method"] == "textual_ga"]["gflop"].tolist() == [0.0, 400.0, 800.0, 1600.0, 3200.0]
    assert costed["compliance_image"].tolist() == BOTH["compliance_image"].tolist()
    untimed = curves.costed_curve(BOTH, per_step[per_step["method"] == "textual_ga"])
    assert untimed.loc[(untimed["method"] == "multimodal_ga") & (untimed["step"] > 0), "seconds"].isna().all()
    with pytest.raises(TuError, match=r"lacks column\(s\) \['gflop_per_step'\]"):
        curves.costed_curve(BOTH, per_step.drop(columns=["gflop_per_step"]))
