"""Parameter validation: papermill accepts anything, so tu_lib.params must refuse bad input early."""
import pytest
import yaml

from tu_lib.core import ParameterError, params, paths
from tu_lib.data import curation as curate
from tu_lib.stages import assignment, cost, evaluate, organism, repgap, unlearn

SPECS = [organism.SPEC, curate.SPEC, unlearn.SPEC, evaluate.SPEC, cost.SPEC, repgap.SPEC, assignment.SPEC]
PROFILES = ["smoke", "default", "paper"]


def base(**over):
    ns = {"profile": "smoke", "seed": 0}
    ns.update(over)
    return ns


def test_profile_fills_unset_values_and_explicit_values_win():
    P = params.resolve(curate.SPEC, base(n_t1=3))
    assert P["n_t1"] == 3
    assert P["n_t2"] == yaml.safe_load((params.configs_dir() / "smoke" / "01_data.yaml").read_text())["n_t2"]
    assert P["forget_source"] == "donotanswer"


@pytest.mark.parametrize("ns, words", [
    (base(profile="nonsense"), ["Unknown profile 'nonsense'", "smoke"]),
    (base(seed="abc"), ["seed='abc'", "int"]),
    (base(seed=True), ["seed=True", "bool"]),
    (base(n_t1=-1), ["n_t1=-1", "non-negative"]),
    (base(n_t1="most"), ["n_t1='most'", "'all'"]),
    (base(n_t11=5), ["n_t11", "did you mean 'n_t1'"]),
    (base(near_dup_threshold=1.5), ["near_dup_threshold=1.5", "between 0 and 1"]),
    (base(forget_source="web"), ["forget_source='web'", "donotanswer"]),
    (base(profile=3), ["profile=3"]),
    (base(pku_local_dir="no/such/folder"), ["pku_local_dir='no/such/folder'", "no folder", "repository root"]),
])
def test_bad_parameters_are_refused_with_the_fix(ns, words):
    with pytest.raises(ParameterError) as err:
        params.resolve(curate.SPEC, ns)
    for w in words:
        assert w in str(err.value)


def test_ints_are_accepted_for_floats_and_all_for_sizes():
    P = params.resolve(curate.SPEC, base(near_dup_threshold=1, n_v1="all"))
    assert P["near_dup_threshold"] == 1.0 and isinstance(P["near_dup_threshold"], float)
    assert P["n_v1"] == "all"


def test_notebook_machinery_is_not_mistaken_for_parameters():
    import math

    ns = base(In=[], Out={}, get_ipython=lambda: None, math=math, _hidden=1, curate=curate)
    assert params.resolve(curate.SPEC, ns) == params.resolve(curate.SPEC, base())  # no error, nothing picked up


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.notebook)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_file_resolves(spec, profile):
    # the check is that this does not raise: resolve stops on an unknown, mistyped, bad or missing profile value
    P = params.resolve(spec, {"profile": profile})
    assert P["profile"] == profile


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.notebook)
def test_parameters_cell_matches_spec(spec):
    """The notebook's parameters cell declares exactly the spec's names (papermill's API = tu_lib's)."""
    import ast
    import json

    nb = json.loads((paths.repo_root() / "notebooks" / f"{spec.notebook}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    names = [getattr(n, "target", None) or n.targets[0] for n in tree.body]
    assert [n.id for n in names] == spec.names()
    ns = {}
    exec("".join(cell["source"]), ns)
    for p in spec.params:
        assert ns[p.name] == p.default, p.name


def test_local_folders_are_taken_from_the_repository_root(monkeypatch, tmp_path):
    # papermill may run the kernel in notebooks/ (nbconvert does): a relative folder must not depend on that
    monkeypatch.chdir(tmp_path)
    P = params.resolve(curate.SPEC, base(pku_local_dir="data"))
    assert P["pku_local_dir"] == str(paths.repo_root() / "data")
    assert params.resolve(curate.SPEC, base())["pku_local_dir"] == ""  # unset stays unset


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.notebook)
def test_profiles_set_only_the_values_the_spec_leaves_to_them(spec):
    """One source per value: a parameter with a default in the Spec (and the parameters cell) is not set again by a
    profile, and a profiled parameter (None: "the profile's value") gets a value from every profile that has a file."""
    profiled = {p.name for p in spec.params if p.profiled}
    for profile in PROFILES:
        path = params.configs_dir() / profile / f"{spec.notebook}.yaml"
        if not path.is_file():
            continue
        values = yaml.safe_load(path.read_text()) or {}
        assert values.get("profile", profile) == profile, f"{path}: names another profile"
        second = sorted(set(values) - profiled - {"profile"})
        assert not second, f"{path} sets {second}, whose default the Spec (and the parameters cell) already gives"
        missing = sorted(profiled - set(values))
        assert not missing, f"{path} leaves the profiled {missing} unset"


def test_run_settings_defaults_are_the_notebook_defaults():
    """TrainConfig (stage 02's run settings, also built by stage 04 and tests) takes its defaults from the same
    place as stage 02's Spec: every field that is a parameter with a default has that default, and every field of a
    profiled parameter has the default profile's value."""
    import dataclasses

    from tu_lib.methods.config import TrainConfig

    default_profile = params.profile_values("default", unlearn.SPEC.notebook)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in unlearn.SPEC.names() or f.default is dataclasses.MISSING:
            continue  # not a notebook parameter, or required (method, steps, lr, batch_size)
        p = unlearn.SPEC.get(f.name)
        expected = default_profile[f.name] if p.profiled else p.default
        value = list(f.default) if isinstance(f.default, tuple) else f.default
        assert value == expected, f"TrainConfig.{f.name} = {value!r}, notebook 02 gives {expected!r}"
