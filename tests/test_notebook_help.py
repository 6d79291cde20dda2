"""`papermill --help-notebook` is the notebooks' API reference: every parameter has a type, a default and a
meaning, and the parameters cell names exactly the parameters tu_lib validates (no silent drift)."""
from __future__ import annotations

import importlib

import papermill as pm
import pytest

from tu_lib.core import repo_root

MODULES = {"00_organism": "organism", "01_data": "curate", "02_unlearn": "unlearn", "03_eval": "evaluate",
           "04_cost": "cost", "05_repgap": "repgap", "06_assignment": "assignment"}


def test_every_notebook_has_a_validating_module():
    assert {p.stem for p in (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")} == set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_help_lists_type_default_and_meaning_of_every_parameter(name):
    found = pm.inspect_notebook(str(repo_root() / "notebooks" / f"{name}.ipynb"))
    spec = importlib.import_module(f"tu_lib.stages.{MODULES[name]}").SPEC
    assert spec.notebook == name
    assert list(found) == spec.names(), "the parameters cell and tu_lib's Spec must list the same parameters, in order"
    for p in found.values():
        assert p["inferred_type_name"] not in ("", "None"), f"{name}: {p['name']} has no type annotation"
        assert p["default"] not in ("",), f"{name}: {p['name']} has no default"
        assert len(p["help"].split()) >= 2, f"{name}: {p['name']} needs a comment that says what it means"
