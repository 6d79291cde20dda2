"""Reviewer views: README's expected-results block matches the figures' CSVs; the HTML report renders."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tu_lib.core import TuError, repo_root
from tu_lib.stages import report


def test_readme_expected_results_match_the_committed_figure_csvs():
    text = (repo_root() / "README.md").read_text()
    assert report.readme_block() in text, "README's expected results differ from figures/*.csv: run `python -m tu_lib.stages.report readme`"


def test_every_committed_figure_is_in_the_readme_gallery():
    text = (repo_root() / "README.md").read_text()
    shown = set(re.findall(r"\]\((figures/[^)]+\.png)\)", text))
    committed = {f"figures/{p.name}" for p in (repo_root() / "figures").glob("*.png")}
    assert committed == shown


def test_expected_results_numbers_come_from_the_csv(tmp_path):
    for p in (repo_root() / "figures").glob("*.csv"):
        shutil.copy(p, tmp_path / p.name)
    csv = tmp_path / "03_eval_asr.csv"
    lines = csv.read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("organism,base,v1_figstep,asr,refusal_keywords,"))
    f = lines[i].split(",")
    f[6:10] = ["0.123", f[7], "0.011", "0.234"]  # rate, n, ci_low, ci_high
    lines[i] = ",".join(f)
    csv.write_text("\n".join(lines) + "\n")
    assert "0.12 [0.01, 0.23]" in report.expected_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\nrest\n")
    assert report.update_readme(readme, tmp_path) and not report.update_readme(readme, tmp_path)
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")
    (tmp_path / "04_cost_steps.csv").unlink()
    with pytest.raises(TuError, match="04_cost_steps"):
        report.expected_results(tmp_path)


def test_html_report_of_executed_notebooks(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    nb = json.loads((repo_root() / "tests" / "nbval" / "05_repgap.smoke.ipynb").read_text())
    figs = tmp_path / "smoke_figures"  # the run's figure folder, as its fig_dir parameter says
    figs.mkdir()
    shutil.copy(repo_root() / "figures" / "05_repgap_alpha.png", figs / "05_repgap_alpha.png")
    nb["metadata"]["papermill"]["parameters"]["fig_dir"] = str(figs)
    (nbs / "05_repgap.ipynb").write_text(json.dumps(nb))
    (nbs / "00_organism.check.ipynb").write_text(json.dumps(nb))  # a variant run (make organism-check): not reported
    index = report.render_report(nbs, tmp_path / "report")
    page = index.read_text()
    assert "05_repgap.html" in page and "representation gap" in page and "00_organism" not in page and "profile=&#x27;smoke&#x27;" in page
    assert (tmp_path / "report" / "05_repgap.html").stat().st_size > 10_000
    # the gallery shows this run's figures only (not the committed default run's others in figures/)
    assert sorted(p.name for p in (tmp_path / "report" / "figures").iterdir()) == ["05_repgap_alpha.png"]
    assert page.count("<figure>") == 1
    with pytest.raises(TuError, match="make reproduce"):
        report.render_report(tmp_path / "empty", tmp_path / "r2")


def _figures_copy(folder):
    folder.mkdir()
    for p in (repo_root() / "figures").glob("*.csv"):
        shutil.copy(p, folder / p.name)
    return folder


def _edit(path, match, column, value):
    import pandas as pd

    df = pd.read_csv(path)
    rows = [i for i, r in df.iterrows() if all(str(r[k]) == str(v) for k, v in match.items())]
    assert len(rows) == 1, rows
    df[column] = df[column].astype(object)
    df.loc[rows[0], column] = value
    df.to_csv(path, index=False, lineterminator="\n")


@pytest.mark.parametrize("folder", ["figures", "tests/nbval/smoke_figures"])
def test_every_committed_figure_csv_has_a_rule_that_names_each_of_its_columns(folder):
    import pandas as pd

    assert sorted((repo_root() / folder).glob("*.csv"))
    for p in sorted((repo_root() / folder).glob("*.csv")):
        rule = report.COMPARE_RULES.get(p.stem)
        assert rule is not None, f"{p.name} has no comparison rule in tu_lib.stages.report.COMPARE_RULES"
        assert set(pd.read_csv(p).columns) == rule.columns(), p.name
        assert not rule.skip or rule.why, f"{p.name}: columns left uncompared need their reason"


def _zero_row(folder, n=50) -> dict:
    """The key of a committed 03_eval_asr row at 0% with CI [0, 0] on `n` items (derived, so the tests follow the
    committed figures when a stage changes them)."""
    import pandas as pd

    df = pd.read_csv(folder / "03_eval_asr.csv")
    row = df[(df["rate"] == 0) & (df["ci_high"] == 0) & (df["n"] == n)].iloc[0]
    return {k: row[k] for k in ("method", "set", "metric", "judge")}


def _committed_row(folder, name, match):
    import pandas as pd

    df = pd.read_csv(folder / f"{name}.csv")
    rows = df[[all(str(r[k]) == str(v) for k, v in match.items()) for _, r in df.iterrows()]]
    assert len(rows) == 1, (name, match)
    return rows.iloc[0], df


def test_compare_passes_a_rerun_inside_and_fails_each_kind_of_cell_outside(tmp_path, capsys):
    """Every edit is derived from the committed figures (they change when the organism or a stage changes): a rate at
    its CI's end passes; just past it, one pooled item more, a count + 1, a float past its tolerance each fail."""
    from tu_lib.stages.report import ANALYTIC_RTOL, FLOAT_RTOL, _fmt

    committed, rerun = _figures_copy(tmp_path / "committed"), _figures_copy(tmp_path / "rerun")
    key = {"method": "base", "set": "t1_advbench", "metric": "asr", "judge": "refusal_keywords"}
    asr, asr_all = _committed_row(committed, "03_eval_asr", key)
    _edit(rerun / "03_eval_asr.csv", key, "rate", asr["ci_high"])  # inside: at the CI's end
    assert report.compare_figures(rerun, committed)
    out = capsys.readouterr().out
    assert (f"method=base set=t1_advbench metric=asr judge=refusal_keywords judge_version={asr['judge_version']} | "
            f"rate: committed {_fmt(asr['rate'])} [{_fmt(asr['ci_low'])}, {_fmt(asr['ci_high'])}], "
            f"rerun {_fmt(asr['ci_high'])} — inside committed 95% CI: ok") in out
    cells = len(asr_all) * (1 + len(report.COMPARE_RULES["03_eval_asr"].exact))  # the rate and each exact column
    assert f"03_eval_asr.csv: {cells} / 0" in out and "all cells pass" in out
    pooled_key = {"panel": "degenerate answers (all sets)", "line": "base + CMRM (dataset)", "alpha": 1.0}
    pooled, _ = _committed_row(committed, "05_repgap_alpha", pooled_key)
    loss_key = {"method": "textual_ga", "term": "forget_nll", "step": 1}
    loss, losses = _committed_row(committed, "02_unlearn_losses", loss_key)
    loss_tol = FLOAT_RTOL * losses[(losses["method"] == "textual_ga") & (losses["term"] == "forget_nll")]["value"].abs().max()
    cost_key = {"method": "textual_ga", "repeat": 0, "step": 1}
    cost, _ = _committed_row(committed, "04_cost_steps", cost_key)
    count_key = {"set": "t1_advbench", "category": "Autonomy"}
    count, _ = _committed_row(committed, "01_data_counts", count_key)
    outside = [  # (file, row, column, value): one cell outside its rule each
        ("03_eval_asr", key, "rate", asr["ci_high"] + 0.02),                            # just past the CI's end
        ("05_repgap_alpha", pooled_key, "rate", pooled["rate"] + 1 / pooled["n"]),     # pooled, no CI: one item more
        ("01_data_counts", count_key, "n_category", int(count["n_category"]) + 1),     # a count
        ("02_unlearn_losses", loss_key, "value", loss["value"] + 1.2 * loss_tol),       # past the series' tolerance
        ("04_cost_steps", cost_key, "gflop", cost["gflop"] * (1 + 1000 * ANALYTIC_RTOL)),  # counted: no tolerance
    ]
    for name, match, column, value in outside:
        shutil.copy(committed / f"{name}.csv", rerun / f"{name}.csv")
        _edit(rerun / f"{name}.csv", match, column, value)
    _edit(rerun / "04_cost_steps.csv", {"method": "textual_ga", "repeat": 0, "step": 2}, "seconds", 99.0)  # not compared
    assert not report.compare_figures(rerun, committed, outside_only=True)
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if line.endswith("OUTSIDE")]
    assert len(failing) == len(outside), failing
    assert (f"rate: committed {_fmt(asr['rate'])} [{_fmt(asr['ci_low'])}, {_fmt(asr['ci_high'])}], "
            f"rerun {_fmt(asr['ci_high'] + 0.02)} — inside committed 95% CI: OUTSIDE") in out
    assert f"rate: committed {_fmt(pooled['rate'])} (no CI), rerun {_fmt(pooled['rate'] + 1 / pooled['n'])} — items apart 1 <= 0: OUTSIDE" in out
    assert f"| value: committed {_fmt(loss['value'])}, rerun {_fmt(loss['value'] + 1.2 * loss_tol)} —" in out
    assert "seconds" not in "".join(failing)
    # a row the rerun lacks is outside too
    import pandas as pd

    df = pd.read_csv(committed / "04_cost_ratio.csv")
    for name in ("03_eval_asr", "05_repgap_alpha", "01_data_counts", "02_unlearn_losses", "04_cost_steps"):
        shutil.copy(committed / f"{name}.csv", rerun / f"{name}.csv")
    df.iloc[1:].to_csv(rerun / "04_cost_ratio.csv", index=False)
    assert not report.compare_figures(rerun, committed, outside_only=True)
    assert "(row): committed present, rerun absent — row in both: OUTSIDE" in capsys.readouterr().out


def test_compare_reads_git_head_when_the_rerun_overwrote_the_committed_folder(tmp_path, capsys):
    import subprocess

    figs = tmp_path / "figures"
    figs.mkdir()
    shutil.copy(repo_root() / "figures" / "03_eval_asr.csv", figs / "03_eval_asr.csv")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "figures"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    assert report.compare_figures(figs, figs, root=tmp_path)
    assert "(git HEAD)" in capsys.readouterr().out
    _edit(figs / "03_eval_asr.csv", _zero_row(figs), "rate", 0.5)  # the rerun's file on disk; HEAD keeps 0.00 [0.00, 0.00]
    assert not report.compare_figures(figs, figs, root=tmp_path)
    assert "rate: committed 0 [0, 0], rerun 0.5 — inside committed 95% CI: OUTSIDE" in capsys.readouterr().out


def test_compare_command_exits_non_zero_when_a_cell_is_outside_and_says_what_to_pass(tmp_path):
    committed, rerun = _figures_copy(tmp_path / "committed"), tmp_path / "rerun"
    rerun.mkdir()
    shutil.copy(committed / "05_repgap_alpha.csv", rerun / "05_repgap_alpha.csv")
    with pytest.raises(SystemExit) as e:
        report.main(["compare", "--rerun", str(rerun), "--committed", str(committed)])
    assert e.value.code == 0
    key = {"panel": "V1 FigStep: ASR (keywords)", "line": "base + CMRM (dataset)", "alpha": 0.0}
    row, _ = _committed_row(committed, "05_repgap_alpha", key)
    _edit(rerun / "05_repgap_alpha.csv", key, "rate", row["ci_high"] + 0.1 if row["ci_high"] <= 0.9 else row["ci_low"] - 0.1)
    with pytest.raises(SystemExit) as e:
        report.main(["compare", "--rerun", str(rerun), "--committed", str(committed), "--outside-only"])
    assert e.value.code == 1
    with pytest.raises(SystemExit, match="does not exist: pass --rerun DIR"):
        report.main(["compare", "--rerun", str(tmp_path / "nowhere"), "--committed", str(committed)])
    (rerun / "05_repgap_alpha.csv").rename(rerun / "other.csv")
    with pytest.raises(SystemExit, match="No figure CSV of the rerun"):
        report.main(["compare", "--rerun", str(rerun), "--committed", str(committed)])


def test_items_tolerance_passes_one_flipped_answer_and_nothing_more(tmp_path, capsys):
    """The smoke comparison's --items 1: a rate one item from the committed count passes even when its CI is [0, 0];
    two items apart fail."""
    committed, rerun = _figures_copy(tmp_path / "committed"), _figures_copy(tmp_path / "rerun")
    key = _zero_row(committed)  # 0.00 [0.00, 0.00], n 50
    _edit(rerun / "03_eval_asr.csv", key, "rate", 1 / 50)
    assert not report.compare_figures(rerun, committed, outside_only=True)  # CI only: one item is outside [0, 0]
    assert report.compare_figures(rerun, committed, items=1)
    assert "inside committed 95% CI or items apart 1 <= 1: ok" in capsys.readouterr().out
    _edit(rerun / "03_eval_asr.csv", key, "rate", 2 / 50)
    assert not report.compare_figures(rerun, committed, items=1, outside_only=True)
    assert "items apart 2 <= 1: OUTSIDE" in capsys.readouterr().out


def test_the_loosened_comparisons_still_catch_real_changes(tmp_path, capsys):
    """Mutations a reviewer would want caught, applied to the committed figures and compared with the smoke run's
    tolerance (--items 1): a refusal judge that never refuses, and gradient ascent with the wrong sign."""
    import pandas as pd

    committed = _figures_copy(tmp_path / "committed")
    never_refuses = _figures_copy(tmp_path / "never_refuses")
    asr = pd.read_csv(committed / "03_eval_asr.csv")
    keyword = asr["judge"] == "refusal_keywords"
    asr.loc[keyword & (asr["metric"] == "asr"), "rate"] = 1.0            # every attack "succeeds"
    asr.loc[keyword & (asr["metric"] == "over_refusal"), "rate"] = 0.0   # and no safe prompt is refused
    asr.to_csv(never_refuses / "03_eval_asr.csv", index=False, lineterminator="\n")
    assert not report.compare_figures(never_refuses, committed, items=1, outside_only=True)
    out = capsys.readouterr().out
    assert out.count("OUTSIDE") > 20, out[-2000:]
    flipped = _figures_copy(tmp_path / "flipped")
    losses = pd.read_csv(committed / "02_unlearn_losses.csv")
    ascent = (losses["method"].isin(["textual_ga", "multimodal_ga"])) & (losses["term"] == "loss") & (losses["step"] > 1)
    losses.loc[ascent, "value"] = -losses.loc[ascent, "value"]  # the trajectory of a descent on the forget answers
    losses.to_csv(flipped / "02_unlearn_losses.csv", index=False, lineterminator="\n")
    assert not report.compare_figures(flipped, committed, items=1, outside_only=True)
    assert "02_unlearn_losses.csv: " in capsys.readouterr().out


def test_a_curve_csv_compares_each_rate_column_inside_its_own_ci():
    """Wide tables (training curves): each rate column against its own committed CI, its n exactly, and a rate that
    is empty on both sides (a pool without items) passes."""
    import pandas as pd

    rule = report.CsvRule(("method", "step"), ci_rates=("benign_reading", "mc1"), exact=("checkpoint",))
    committed = pd.DataFrame({"method": ["a", "a"], "step": [0, 4], "checkpoint": ["base", "runs/a"],
                              "benign_reading": [0.6, 0.5], "benign_reading_n": [20, 20],
                              "benign_reading_ci_low": [0.4, 0.3], "benign_reading_ci_high": [0.8, 0.7],
                              "mc1": [float("nan"), 0.3], "mc1_n": [0, 10], "mc1_ci_low": [float("nan"), 0.1],
                              "mc1_ci_high": [float("nan"), 0.6]})
    verdict = lambda df: {(c["row"], c["column"]): c["inside"] for c in report.compare_table("c", committed, df, rule)}
    assert all(verdict(committed.assign(benign_reading=[0.8, 0.3])).values())  # at the CIs' ends
    outside = verdict(committed.assign(benign_reading=[0.6, 0.29]))
    assert not outside[("method=a step=4", "benign_reading")] and outside[("method=a step=0", "benign_reading")]
    assert outside[("method=a step=0", "mc1")]  # empty on both sides
    assert not verdict(committed.assign(mc1_n=[0, 11]))[("method=a step=4", "mc1_n")]
    apart = lambda items: {(c["row"], c["column"]): c["inside"] for c in report.compare_table(
        "c", committed, committed.assign(benign_reading=[0.6, 0.25]), rule, items=items)}[("method=a step=4", "benign_reading")]
    assert apart(5) and not apart(4) and not apart(0)  # 0.25 below 0.5 with n 20: 5 items apart
