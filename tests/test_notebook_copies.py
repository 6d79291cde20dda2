"""nbval executes the smoke copies in tests/nbval, not the notebooks users run: each copy must be its notebook,
cell for cell, run with the smoke profile — otherwise an edited notebook would go untested (`make notebooks`
regenerates the copies)."""
from pathlib import Path

import pytest
from notebook_helpers import code_cells, injected_source

from tu_lib.core import repo_root

COPIES = sorted((repo_root() / "tests" / "nbval").glob("*.smoke.ipynb"))


def test_every_notebook_but_the_data_stage_has_a_smoke_copy():
    # 01 runs as itself (it is fast); 06 has its solution copy, checked in test_assignment
    expected = {p.stem for p in (repo_root() / "notebooks").glob("*.ipynb")} - {"01_data", "06_assignment"}
    assert {Path(p.stem).stem for p in COPIES} == expected


@pytest.mark.parametrize("copy", COPIES, ids=lambda p: p.name)
def test_smoke_copy_is_its_notebook_run_with_the_smoke_profile(copy):
    notebook = repo_root() / "notebooks" / (Path(copy.stem).stem + ".ipynb")
    ours, theirs = code_cells(copy), code_cells(notebook)
    assert ["".join(c["source"]) for c in ours] == ["".join(c["source"]) for c in theirs], (
        f"{copy.name} is out of date with {notebook.name}: run `make notebooks`")
    assert 'profile = "smoke"' in injected_source(copy)
    assert sum(bool(c.get("outputs")) for c in ours) >= 2  # executed, not a bare copy


COMMITTED = sorted((repo_root() / "notebooks").glob("*.ipynb")) + COPIES + sorted(
    (repo_root() / "tests" / "nbval").glob("*.solution.ipynb"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_outputs_carry_no_stderr(path):
    # What a reader sees must be the notebook's own output: library warnings, progress bars and this machine's
    # paths on stderr are noise (and differ between machines). `make notebooks` executes with TU_PROGRESS=0.
    noise = [(i, "".join(o.get("text", ""))[:80]) for i, c in enumerate(code_cells(path))
             for o in c.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not noise, f"{path.name} has stderr outputs (code cell, start): {noise[:3]}; re-execute it with `make notebooks`"
