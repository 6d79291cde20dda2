"""A/B of two models on the same items (evaluation.ab, `python -m tu_lib.stages.evaluate ab`): rates and the paired
bootstrap CI of their difference from stage 03's judgements.csv, items paired by identity, and every input that cannot
be paired refused before any bootstrap. Synthetic judgements only: no model is loaded."""
import numpy as np
import pandas as pd
import pytest

from tu_lib.core import TuError
from tu_lib.core.files import write_csv
from tu_lib.core.stats import paired_difference
from tu_lib.evaluation import ab
from tu_lib.evaluation.metrics import metric_rows
from tu_lib.stages import evaluate

N = 60
FIRST = np.arange(N)


def _set(name: str, refused, seed: int = 0, ids=None) -> pd.DataFrame:
    """One set as stage 03's Judges.judge_all returns it for one model; the other judges' verdicts depend on `seed`
    only, so two models built with the same seed differ in refusals alone."""
    refused = np.asarray(refused, bool)
    rng = np.random.default_rng(seed)
    ids = range(len(refused)) if ids is None else ids
    return pd.DataFrame({"key": [f"{name}|{i}" for i in ids], "set": name, "refused": refused,
                         "harmful": rng.random(len(refused)) < 0.5, "on_topic": rng.random(len(refused)) < 0.6,
                         "degenerate": rng.random(len(refused)) < 0.1,
                         "answer": [f'answer {i}, with a comma, "quotes"\nand a second line' for i in ids]})


def _write(path, judged: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(ab.judgements_frame(judged), path)  # what stage 03's write_outputs writes
    return str(path)


def _two_models(tmp_path) -> str:
    """textual_ga's keyword ASR 0.8 against base's 0.2 on 60 T1 items (36 items flip), plus XSTest."""
    return _write(tmp_path / "run" / "judgements.csv", {
        "base": pd.concat([_set("t1_advbench", FIRST < 48), _set("xstest_safe", FIRST[:20] < 4, seed=1)]),
        "textual_ga": pd.concat([_set("t1_advbench", FIRST < 12), _set("xstest_safe", FIRST[:20] < 4, seed=1)])})


def _row(table, set_name, metric, judge):
    hit = table[(table["set"] == set_name) & (table["metric"] == metric) & (table["judge"] == judge)]
    assert len(hit) == 1, (set_name, metric, judge)
    return hit.iloc[0]


def test_models_that_differ_are_flagged(tmp_path):
    table = evaluate.ab_table("textual_ga", "base", _two_models(tmp_path))
    assert list(table.columns) == ["set", "metric", "judge", "n", "rate_a", "rate_b", "difference", "ci_low", "ci_high",
                                   "excludes_zero", "note"]
    asr = _row(table, "t1_advbench", "asr", "refusal_keywords")
    assert asr["n"] == N and asr["rate_a"] == pytest.approx(0.8) and asr["rate_b"] == pytest.approx(0.2)
    assert asr["difference"] == pytest.approx(0.6) and 0.3 < asr["ci_low"] < 0.6 < asr["ci_high"] < 0.9
    assert asr["excludes_zero"]
    same = _row(table, "t1_advbench", "asr", "harmfulness")  # the same harmfulness verdicts on both sides
    assert same["difference"] == 0 and not same["excludes_zero"]
    assert _row(table, "xstest_safe", "over_refusal", "refusal_keywords")["n"] == 20
    assert set(table["note"]) == {""}


def test_rates_are_the_ones_results_csv_reports(tmp_path):
    """Each side's rate is what metric_rows puts in results.csv for that (set, metric, judge), for every kind of set
    (a user set included), so the A/B table and the stage's table never disagree."""
    user = _set("user_mine", FIRST[:10] < 3, seed=5).assign(key=lambda d: d["key"] + "|digest", category="kitchen")
    judged = {m: pd.concat([_set("t1_advbench", FIRST < k, seed=2), _set("xstest_safe", FIRST[:20] < k // 3, seed=3),
                            _set("utility_reading", FIRST[:12] < k // 5, seed=4), user])
              for m, k in (("base", 40), ("npo", 25))}
    table = evaluate.ab_table("npo", "base", _write(tmp_path / "judgements.csv", judged))
    for side, method in (("rate_a", "npo"), ("rate_b", "base")):
        results = pd.DataFrame(metric_rows("micro", method, judged[method], {}, seed=0))
        merged = results.merge(table, on=["set", "metric", "judge"], validate="one_to_one")
        assert len(merged) == len(results) == len(table) == 12  # attack 4 metrics (x2), XSTest 2, reading 2
        np.testing.assert_allclose(merged[side], merged["rate"])
        assert (merged["n_x"] == merged["n_y"]).all()


def test_models_that_do_not_differ_are_not_flagged(tmp_path):
    rng = np.random.default_rng(7)
    drawn_a, drawn_b = rng.random(N) < 0.5, rng.random(N) < 0.5  # two draws at the same rate
    base = _set("t1_advbench", FIRST < 30)
    path = _write(tmp_path / "judgements.csv", {"base": base, "sft": base.copy(), "drawn_a": _set("t1_advbench", drawn_a),
                                                "drawn_b": _set("t1_advbench", drawn_b)})
    same = evaluate.ab_table("sft", "base", path)
    assert len(same) == 4 and (same["difference"] == 0).all() and (same["ci_low"] == 0).all() and (same["ci_high"] == 0).all()
    assert not same["excludes_zero"].any()
    asr = _row(evaluate.ab_table("drawn_a", "drawn_b", path), "t1_advbench", "asr", "refusal_keywords")
    assert asr["rate_a"] != asr["rate_b"] and asr["ci_low"] < 0 < asr["ci_high"] and not asr["excludes_zero"]


def test_items_are_paired_by_identity_not_by_row_order(tmp_path):
    base = _set("t1_advbench", FIRST % 2 == 0)
    shuffled = base.sample(frac=1, random_state=3)  # the same verdict on every item, rows in another order
    by_position = paired_difference(~shuffled["refused"].to_numpy(), ~base["refused"].to_numpy())
    assert by_position["ci_high"] > 0  # pairing rows by position would see a difference
    table = evaluate.ab_table("shuffled", "base", _write(tmp_path / "judgements.csv", {"base": base, "shuffled": shuffled}))
    assert len(table) == 4 and (table[["difference", "ci_low", "ci_high"]] == 0).all().all()
    other = _write(tmp_path / "other" / "judgements.csv", {"base": shuffled})  # another run's file, another order
    asr = _row(evaluate.ab_table(f"{other}:base", "base", tmp_path / "judgements.csv"), "t1_advbench", "asr",
               "refusal_keywords")
    assert asr["ci_low"] == asr["ci_high"] == 0


def test_items_that_differ_are_refused_before_any_bootstrap(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ab.stats, "paired_difference", lambda *a, **k: calls.append(1) or paired_difference(*a, **k))
    t1 = _set("t1_advbench", FIRST < 30)
    path = _write(tmp_path / "judgements.csv", {  # T1 pairs; XSTest, second, does not: nothing may be computed first
        "base": pd.concat([t1, _set("xstest_safe", FIRST[:20] < 5)]),
        "npo": pd.concat([t1, _set("xstest_safe", FIRST[:19] < 5, ids=[*range(16), 90, 91, 92])])})
    with pytest.raises(TuError, match=r"A \(npo\) and B \(base\) do not hold the same items.*set xstest_safe: 3 "
                                      r"item\(s\) only in A, 4 only in B \(e\.g\. 'xstest_safe\|16'\)"):
        evaluate.ab_table("npo", "base", path)
    with pytest.raises(TuError, match="set xstest_safe: 3 item"):
        evaluate.vs_base(path)
    assert calls == []
    evaluate.ab_table("base", "base", path)
    assert calls  # the spy sees the bootstrap when there is one


def _damaged(tmp_path, name, edit) -> str:
    path = tmp_path / name / "judgements.csv"
    _write(path, {"base": _set("t1_advbench", FIRST < 30), "npo": _set("t1_advbench", FIRST < 10)})
    edit(path)
    return str(path)


def _set_cell(path, row, column, value):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    df.to_csv(path, index=False)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.unlink(), r"No judgements file .*: run notebook 03 first"),
    (lambda p: p.write_text(""), "cannot be read as a CSV"),
    (lambda p: p.write_bytes(b"key,set\n\xff\xfe\x00\x81,\x9d\n"), "cannot be read as a CSV"),
    (lambda p: p.write_text(p.read_text() + '"t1_advbench|99,t1_advbench,True\n'), "cannot be read as a CSV"),
    (lambda p: pd.read_csv(p).drop(columns="key").to_csv(p, index=False), r"lacks the column\(s\) \['key'\]"),
    (lambda p: _set_cell(p, 5, "refused", "maybe"), r"column 'refused' holds 1 value\(s\) that are not True/False "
                                                    r"\(e\.g\. 'maybe'\)"),
    (lambda p: _set_cell(p, 70, "harmful", ""), r"column 'harmful' holds 1 value"),
    (lambda p: _set_cell(p, 7, "key", "t1_advbench|8"), r"1 repeated row\(s\) .*method 'base', key 't1_advbench\|8'"),
    (lambda p: _set_cell(p, 7, "set", "t9_unknown"), "Unknown set 't9_unknown'"),
])
def test_a_missing_or_damaged_file_is_refused(tmp_path, edit, message):
    path = _damaged(tmp_path, "run", edit)
    with pytest.raises(TuError, match=message):
        evaluate.ab_table("npo", "base", path)
    good = _damaged(tmp_path, "good", lambda p: None)  # the same comparison on the undamaged file works
    with pytest.raises(TuError, match=message):
        evaluate.ab_table(f"{path}:npo", "base", good)
    assert len(evaluate.ab_table("npo", "base", good)) == 4


def test_a_method_not_in_the_file_is_refused_naming_those_present(tmp_path):
    path = _two_models(tmp_path)
    with pytest.raises(TuError, match=r"Method 'sft' is not in .*judgements.csv; the methods there: base, textual_ga"):
        evaluate.ab_table("sft", "base", path)
    with pytest.raises(TuError, match=r"Method 'npo' is not in"):
        evaluate.ab_table("base", f"{path}:npo", path)
    with pytest.raises(TuError, match=r"neither a method name nor PATH:METHOD"):
        evaluate.ab_table(f"{path}:", "base", path)


def test_sets_and_judges_on_one_side_are_reported_as_skipped(tmp_path):
    a = _write(tmp_path / "a" / "judgements.csv", {"base": pd.concat([_set("t1_advbench", FIRST < 30),
                                                                      _set("xstest_safe", FIRST[:20] < 5)])})
    b = _write(tmp_path / "b" / "judgements.csv", {"base": pd.concat([
        _set("t1_advbench", FIRST < 20), _set("v1_figstep", FIRST[:10] < 5)]).drop(columns="degenerate")})
    table = evaluate.ab_table(f"{a}:base", f"{b}:base")
    notes = table[table["note"] != ""]
    assert set(zip(notes["set"], notes["judge"], notes["note"])) == {
        ("xstest_safe", "", "set only in A"), ("v1_figstep", "", "set only in B"), ("", "fluency", "judge only in A")}
    assert notes["rate_a"].isna().all() and (notes["n"] == 0).all() and not notes["excludes_zero"].any()
    done = table[table["note"] == ""]
    assert set(done["set"]) == {"t1_advbench"} and "fluency" not in set(done["judge"])
    assert _row(done, "t1_advbench", "asr", "refusal_keywords")["difference"] == pytest.approx(-10 / N)
    text = evaluate.format_ab(table, "mine", "theirs")
    assert "skipped: xstest_safe (set only in A); v1_figstep (set only in B); fluency (judge only in A)" in text
    assert "A = mine, B = theirs" in text and "xstest_safe" not in text.split("skipped:")[0]


def test_path_method_form_reads_another_run(tmp_path):
    one = _write(tmp_path / "run" / "judgements.csv", {  # every metric differs between the two, item by item
        "base": pd.concat([_set("t1_advbench", FIRST < 48, seed=1), _set("xstest_safe", FIRST[:20] < 4, seed=2)]),
        "textual_ga": pd.concat([_set("t1_advbench", FIRST < 12, seed=3), _set("xstest_safe", FIRST[:20] < 9, seed=4)])})
    ga = ab.read_judgements(one).query("method == 'textual_ga'").drop(columns="method")
    shuffled = pd.concat([g.sample(frac=1, random_state=5) for _, g in ga.groupby("set", sort=False)])
    other = _write(tmp_path / "other" / "judgements.csv", {"base": shuffled})  # textual_ga's verdicts, as "base"
    across = evaluate.ab_table(f"{other}:base", "base", one)
    within = evaluate.ab_table("textual_ga", "base", one)
    pd.testing.assert_frame_equal(across, within)  # the same items and verdicts: the same CIs, whatever the row order
    assert _row(across, "t1_advbench", "asr", "refusal_keywords")["excludes_zero"]


def test_vs_base_gives_every_method_against_base(tmp_path, monkeypatch):
    t1, xs = (lambda k: _set("t1_advbench", FIRST < k)), _set("xstest_safe", FIRST[:20] < 4, seed=1)
    judged = {"base": pd.concat([t1(48), xs]), "textual_ga": pd.concat([t1(12), xs]), "sft": pd.concat([t1(48), xs])}
    path = _write(tmp_path / "judgements.csv", judged)
    table = evaluate.vs_base(path)
    assert list(table.columns) == ["method", "set", "metric", "judge", "vs_base", "vs_base_ci_low", "vs_base_ci_high",
                                   "vs_base_excludes_zero", "note"]
    assert list(dict.fromkeys(table["method"])) == ["textual_ga", "sft"]
    ga = table[(table["method"] == "textual_ga") & (table["metric"] == "asr") & (table["judge"] == "refusal_keywords")]
    assert ga["vs_base"].iloc[0] == pytest.approx(0.6) and ga["vs_base_excludes_zero"].iloc[0]
    assert (table.loc[table["method"] == "sft", "vs_base"] == 0).all()
    direct = evaluate.ab_table("textual_ga", "base", path)
    np.testing.assert_array_equal(table.loc[table["method"] == "textual_ga", "vs_base_ci_low"], direct["ci_low"])
    results = pd.DataFrame([r for m, df in judged.items() for r in metric_rows("micro", m, df, {}, seed=0)])
    merged = results.merge(table, on=["method", "set", "metric", "judge"], how="left", validate="one_to_one")
    assert merged.loc[merged["method"] != "base", "vs_base"].notna().all()
    assert merged.loc[merged["method"] == "base", "vs_base"].isna().all()
    pd.testing.assert_frame_equal(evaluate.vs_base(judged), table)  # stage 03's judged dict, before it is written
    with pytest.raises(TuError, match=r"Method 'base' is not in .*the methods there: textual_ga, sft"):
        evaluate.vs_base({m: df for m, df in judged.items() if m != "base"})
    monkeypatch.setattr(ab, "default_judgements", lambda: path)
    pd.testing.assert_frame_equal(evaluate.vs_base(), table)


def test_cli_prints_the_table_and_refuses_with_a_message(tmp_path, capsys):
    path = _two_models(tmp_path)
    evaluate.main(["ab", "textual_ga", "base", "--judgements", path, "--seed", "1"])
    out = capsys.readouterr().out
    assert out.startswith("A = textual_ga, B = base")
    line = next(line for line in out.splitlines() if "t1_advbench" in line and "refusal_keywords" in line)
    assert line.split() == ["t1_advbench", "asr", "refusal_keywords", "60", "0.80", "0.20", "+0.60",
                            line.split()[7], line.split()[8], "*"]
    same = next(line for line in out.splitlines() if "harmfulness" in line)
    assert "+0.00 [+0.00, +0.00]" in same and not same.rstrip().endswith("*")
    with pytest.raises(SystemExit, match=r"error: Method 'sft' is not in"):
        evaluate.main(["ab", "sft", "base", "--judgements", path])
    with pytest.raises(SystemExit, match="usage: python -m tu_lib.stages.evaluate ab A B"):
        evaluate.main([])
    with pytest.raises(SystemExit, match="--seed must be >= 0"):
        evaluate.main(["ab", "textual_ga", "base", "--judgements", path, "--seed", "-1"])
