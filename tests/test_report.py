"""Reviewer views: README's expected-results block matches the figures' CSVs; the HTML report renders."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tu_lib import report
from tu_lib.core import TuError, repo_root


def test_readme_expected_results_match_the_committed_figure_csvs():
    text = (repo_root() / "README.md").read_text()
    assert report.readme_block() in text, "README's expected results differ from figures/*.csv: run `python -m tu_lib.report readme`"


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
