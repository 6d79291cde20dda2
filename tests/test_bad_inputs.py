"""Bad input never costs a user their files (issue 21): every case is refused by the notebook's own validation
cell, before any model is loaded, with a message that names the parameter or file and says what to do, and with
nothing written anywhere. Plus one test per defect of the issue's bad-input run."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from notebook_helpers import code_cells, finished_method_run

from tu_lib import core
from tu_lib.core import OUTPUT_MARKER, ParameterError, TuError, params, repo_root, stats
from tu_lib.data import curation as curate
from tu_lib.models.presets import organism as presets_organism
from tu_lib.stages import organism
from tu_lib.training import organism as training_organism

ROOT = repo_root()
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture
def folders(tmp_path):
    """Folders the cases point at: a user's folder, a file, another stage's outputs, a damaged adapter."""
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("a user's file")
    (tmp_path / "file.txt").write_text("a user's file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nosums").mkdir()
    stage01 = core.claim_output_dir(tmp_path / "stage01", "01_data")
    (stage01 / "sets").mkdir()
    old01 = core.claim_output_dir(tmp_path / "old01", "01_data")  # stage 01's output from before the validation/test split
    (old01 / "sets").mkdir()
    for name in curate.SET_NAMES:
        row = {"prompt": f"placeholder {name}", "image_text": "Steps."}
        core.write_jsonl(stage01 / "sets" / f"{name}.jsonl", [{**row, "split": "test"}])
        core.write_jsonl(old01 / "sets" / f"{name}.jsonl", [row])
    core.claim_output_dir(tmp_path / "stage02", "02_unlearn")
    finished_method_run(tmp_path / "damaged" / "textual_ga")
    weights = tmp_path / "damaged" / "textual_ga" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    (tmp_path / "nocard").mkdir()  # the committed organism's parts without their card
    for part in (ROOT / "organism").iterdir():
        if part.name != "card.json":
            (tmp_path / "nocard" / part.name).symlink_to(part)
    (tmp_path / "user").mkdir()  # user sets (notebooks 03 and 05): harmless placeholder prompts
    (tmp_path / "user" / "no_prompt.csv").write_text("question\nHow do I bake bread?\n")
    (tmp_path / "user" / "gone_image.jsonl").write_text('{"prompt": "Describe it.", "image": "gone.png"}\n')
    (tmp_path / "user" / "text_only.csv").write_text("prompt\nHow do I bake bread?\n")
    return tmp_path


def run_validation_cell(notebook: str, tmp: Path, **overrides) -> dict:
    """Execute a notebook's parameters cell, the overrides as papermill would inject them, then its validation
    cell, in this process (the same code a kernel runs, without the kernel's start-up)."""
    cells = code_cells(NOTEBOOKS / f"{notebook}.ipynb")
    namespace: dict = {}
    exec(compile("".join(cells[0]["source"]), f"{notebook}[parameters]", "exec"), namespace)
    namespace.update({k: (v.format(tmp=tmp) if isinstance(v, str) else v) for k, v in overrides.items()})
    exec(compile("".join(cells[1]["source"]), f"{notebook}[validation]", "exec"), namespace)
    return namespace


def snapshot(*roots: Path) -> dict:
    """Every file and folder under the roots with its size and modification time: what 'nothing written' compares."""
    seen = {}
    for root in roots:
        if root.exists():
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    p = Path(dirpath) / name
                    st = p.stat()
                    seen[str(p)] = (st.st_size, st.st_mtime_ns)
    return seen


LONG = "runs/" + "x" * 300
S = {"profile": "smoke"}
CASES = [
    # notebook 00: the organism
    ("00_organism", {"profile": "nope"}, r"Unknown profile 'nope'"),
    ("00_organism", {"seed": -1}, r"seed=-1 must be an integer from 0 to 4294967295"),
    ("00_organism", {"seed": 2**70}, r"seed=1180591620717411303424 is out of range"),
    ("00_organism", {**S, "n_probe": 0}, r"n_probe=0 must be a positive integer or 'all'"),
    ("00_organism", {**S, "n_mc1": "many"}, r"n_mc1='many' must be a positive integer or 'all'"),
    ("00_organism", {**S, "max_new_tokens": 0}, r"max_new_tokens=0 must be > 0"),
    ("00_organism", {**S, "rebuild": "yes"}, r"rebuild='yes' has type str; it must be bool"),
    ("00_organism", {**S, "fig_dir": "README.md"}, r"fig_dir='README.md' is a file"),
    ("00_organism", {**S, "fig_dir": "data"}, r"fig_dir='data' lies in the repository's data/ folder"),
    ("00_organism", {**S, "parts_dir": "{tmp}/empty"}, r"No trained parts in .*pass -p rebuild True"),
    ("00_organism", {**S, "parts_dir": LONG}, r"parts_dir=.* has a folder or file name of 300 bytes"),
    ("00_organism", {**S, "remeasure": "no"}, r"remeasure='no' has type str; it must be bool"),
    ("00_organism", {"parts_dir": "{tmp}/nocard"}, r"No card in .*nocard: measure one with -p remeasure True"),
    ("00_organism", {**S, "n_probes": 3}, r"Unknown parameter\(s\) for 00_organism: 'n_probes' \(did you mean 'n_probe'\?\)"),
    # notebook 01: data curation (it replaces its output folder whole)
    ("01_data", {**S, "seed": -1}, r"seed=-1 must be an integer from 0"),
    ("01_data", {**S, "seed": 2**40}, r"seed=1099511627776 must be an integer from 0 to 4294967295"),
    ("01_data", {**S, "out_dir": "README.md"}, r"out_dir='README.md' is a file, not a folder"),
    ("01_data", {**S, "out_dir": "."}, r"out_dir='\.' is the repository itself"),
    ("01_data", {**S, "out_dir": ".."}, r"out_dir='\.\.' is the repository itself or a folder that holds it"),
    ("01_data", {**S, "out_dir": "data"}, r"out_dir='data' is the repository's own data/ folder"),
    ("01_data", {**S, "out_dir": "organism"}, r"out_dir='organism' is the repository's own organism/ folder"),
    ("01_data", {**S, "out_dir": "{tmp}/foreign"}, r"already holds files, and no \.tu-output\.json marks it"),
    ("01_data", {**S, "out_dir": "{tmp}/stage02"}, r"is the output folder of stage 02_unlearn"),
    ("01_data", {**S, "out_dir": LONG}, r"has a folder or file name of 300 bytes.*pass a shorter path"),
    ("01_data", {**S, "fig_dir": "tu_lib"}, r"fig_dir='tu_lib' lies in the repository's tu_lib/ folder"),
    ("01_data", {**S, "near_dup_threshold": 1.5}, r"near_dup_threshold=1.5 must be between 0 and 1"),
    ("01_data", {**S, "near_dup_threshold": math.nan}, r"near_dup_threshold=nan must be a finite number"),
    ("01_data", {**S, "n_t1": -1}, r"n_t1=-1 must be a non-negative integer or 'all'"),
    ("01_data", {**S, "forget_source": "web"}, r"forget_source='web' must be one of 'donotanswer', 'pku_saferlhf'"),
    ("01_data", {**S, "data_dir": "{tmp}/missing"}, r"data_dir=.*: no folder at"),
    ("01_data", {**S, "data_dir": "{tmp}/nosums"}, r"SHA256SUMS is missing"),
    ("01_data", {**S, "pku_local_dir": "{tmp}/missing"}, r"pku_local_dir=.*: no folder at"),
    ("01_data", {**S, "t3_max_template_chars": 0}, r"t3_max_template_chars=0 must be > 0"),
    ("01_data", {**S, "v2_scenarios": "some"}, r"v2_scenarios='some' must be one of"),
    # notebook 02: unlearning
    ("02_unlearn", {**S, "seed": 2**70}, r"seed=1180591620717411303424 is out of range"),
    ("02_unlearn", {**S, "seed": 2**33}, r"seed=8589934592 must be an integer from 0 to 4294967295"),
    ("02_unlearn", {**S, "steps": 0}, r"steps=0 must be > 0"),
    ("02_unlearn", {**S, "lr": -1.0}, r"lr=-1.0 must be > 0"),
    ("02_unlearn", {**S, "lr": math.inf}, r"lr=inf must be a finite number"),
    ("02_unlearn", {**S, "methods": ["bogus"]}, r"bogus"),
    ("02_unlearn", {**S, "preset": "bogus"}, r"bogus"),
    ("02_unlearn", {**S, "batch_size": 0}, r"batch_size=0 must be > 0"),
    ("02_unlearn", {**S, "n_forget": 0}, r"n_forget=0 must be a positive integer or 'all'"),
    ("02_unlearn", {**S, "lora_r": 0}, r"lora_r=0 must be > 0"),
    ("02_unlearn", {**S, "dtype": "float16"}, r"dtype='float16' must be one of 'auto', 'float32', 'bfloat16'"),
    ("02_unlearn", {**S, "out_dir": "organism"}, r"out_dir='organism' is the repository's own organism/ folder"),
    ("02_unlearn", {**S, "out_dir": "{tmp}/stage01"}, r"is the output folder of stage 01_data"),
    ("02_unlearn", {**S, "out_dir": "{tmp}/stage01/inner"}, r"lies inside .*stage01, the output folder of stage 01_data"),
    ("02_unlearn", {**S, "data_dir": "{tmp}/missing", "out_dir": "{tmp}/o2"}, r"run stage 01 first"),
    # notebook 03: evaluation
    ("03_eval", {**S, "sets": ["bogus"]}, r"bogus"),
    ("03_eval", {**S, "judges": ["harmfulness"]}, r"judges must include 'refusal_keywords'"),
    ("03_eval", {**S, "n_per_set": 0}, r"n_per_set=0 must be a positive integer or 'all'"),
    ("03_eval", {**S, "seed": -1}, r"seed=-1 must be an integer from 0"),
    ("03_eval", {**S, "max_new_tokens": 0}, r"max_new_tokens=0 must be > 0"),
    ("03_eval", {**S, "dtype": "half"}, r"dtype='half' must be one of"),
    ("03_eval", {**S, "out_dir": "{tmp}/file.txt"}, r"is a file, not a folder"),
    ("03_eval", {**S, "data_dir": "{tmp}/stage01", "unlearn_dir": "{tmp}/empty", "methods": "base,textual_ga",
                 "out_dir": "{tmp}/o3"}, r"No complete adapter for method 'textual_ga'"),
    ("03_eval", {**S, "data_dir": "{tmp}/stage01", "unlearn_dir": "{tmp}/damaged", "methods": "base,textual_ga",
                 "out_dir": "{tmp}/o3"}, r"'textual_ga' run .* cannot be trusted: .*adapter_model.safetensors is missing or "
                                         r"changed.*Rerun notebook 02 with `-p methods textual_ga`"),
    ("03_eval", {**S, "data_dir": "{tmp}/stage01", "methods": "base", "user_sets": "{tmp}/user/no_prompt.csv",
                 "out_dir": "{tmp}/o3"}, r"no_prompt\.csv \(header, line 1\) has no `prompt` column"),
    ("03_eval", {**S, "data_dir": "{tmp}/stage01", "methods": "base", "user_sets": "{tmp}/user/gone_image.jsonl",
                 "out_dir": "{tmp}/o3"}, r"gone_image\.jsonl line 1: image 'gone\.png' not found"),
    ("03_eval", {**S, "user_sets": "my_prompts.txt"}, r"user set 'my_prompts\.txt' has the extension '\.txt'"),
    ("03_eval", {**S, "data_dir": "{tmp}/old01", "methods": "base", "split": "test", "out_dir": "{tmp}/o3"},
     r"items carry no validation/test split .*rerun notebook 01.*or pass `-p split all`"),
    ("03_eval", {**S, "split": "train"}, r"split='train' must be one of 'validation', 'test', 'all'"),
    ("03_eval", {**S, "selection_rule": {"max_degenerate_share": 5}}, r"selection_rule=.* sets max_degenerate_share=5"),
    ("03_eval", {**S, "selection_rule": "{{max_degenerate_share: [}}"}, r"selection_rule=.* is not a YAML mapping"),
    # notebook 04: cost
    ("04_cost", {**S, "steps": 0}, r"steps=0 must be > 0"),
    ("04_cost", {**S, "repeats": 0}, r"repeats=0 must be > 0"),
    ("04_cost", {**S, "gpu_utilisation": 2.0}, r"gpu_utilisation=2.0 must be between 0 and 1"),
    ("04_cost", {**S, "methods": ["bogus"]}, r"bogus"),
    ("04_cost", {**S, "out_dir": "{tmp}/foreign"}, r"already holds files"),
    ("04_cost", {**S, "unlearn_dir": "{tmp}/empty"}, r"summary.json is missing: run stage 02"),
    # notebook 05: representation gap
    ("05_repgap", {**S, "alphas": [3]}, r"alpha"),
    ("05_repgap", {**S, "position": "middle"}, r"position='middle' must be one of"),
    ("05_repgap", {**S, "meaningless": "grey"}, r"meaningless='grey' must be one of"),
    ("05_repgap", {**S, "seed": -1}, r"seed=-1 must be an integer from 0"),
    ("05_repgap", {**S, "dtype": "float16"}, r"dtype='float16' must be one of"),
    ("05_repgap", {**S, "layers": "most"}, r"layers"),
    ("05_repgap", {**S, "out_dir": "{tmp}/stage01"}, r"is the output folder of stage 01_data"),
    ("05_repgap", {**S, "data_dir": "{tmp}/stage01", "unlearn_dir": "{tmp}/damaged", "methods": ["textual_ga"],
                   "combine_methods": [], "out_dir": "{tmp}/o5"}, r"cannot be trusted"),
    ("05_repgap", {**S, "data_dir": "{tmp}/stage01", "methods": [], "combine_methods": [],
                   "user_sets": "{tmp}/user/text_only.csv", "out_dir": "{tmp}/o5"},
     r"text_only\.csv line 2 has no image or image_text .*every row needs one"),
    ("05_repgap", {**S, "data_dir": "{tmp}/old01", "methods": [], "combine_methods": [], "split": "test",
                   "out_dir": "{tmp}/o5"},
     r"items carry no validation/test split .*rerun notebook 01"),
]


@pytest.mark.parametrize("notebook,overrides,message", CASES,
                         ids=[f"{nb}-{'-'.join(f'{k}' for k in o if k != 'profile')}-{i}" for i, (nb, o, _) in enumerate(CASES)])
def test_bad_input_is_refused_before_any_work_with_nothing_written(notebook, overrides, message, folders, capsys):
    watched = (folders, ROOT / "runs", ROOT / "figures", ROOT / "organism", ROOT / "data", core.cache_dir())
    before = snapshot(*watched)
    started = time.perf_counter()
    with pytest.raises((TuError, ParameterError)) as err:
        run_validation_cell(notebook, folders, **overrides)
    elapsed = time.perf_counter() - started
    assert __import__("re").search(message, str(err.value)), f"{notebook} {overrides}: {err.value}"
    assert snapshot(*watched) == before, "a refused run must write nothing"
    assert (folders / "foreign" / "keep.txt").read_text() == "a user's file"
    print(f"refused in {elapsed:.2f} s")  # seconds, not minutes: no model was loaded (not asserted: timing flakes)
    assert "torch.nn" not in repr(err.value)


# ---- defect 1: a stage writes only into its own folders ------------------------------------------------------


def test_notebook_01_keeps_a_users_folder(tmp_path):
    """The issue's reproduction, end to end through papermill: keep.txt survives and the run is refused."""
    target = tmp_path / "x"
    target.mkdir()
    (target / "keep.txt").write_text("hi")
    out = subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", str(NOTEBOOKS / "01_data.ipynb"),
                          str(tmp_path / "o.ipynb"), "-p", "profile", "smoke", "-p", "out_dir", str(target)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0
    assert "already holds files" in out.stderr + out.stdout
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"] and (target / "keep.txt").read_text() == "hi"


def test_a_stage_replaces_only_its_own_output_folder(tmp_path):
    """atomic_dir(stage=...) refuses a foreign folder on its own too (defence beside the parameter check), marks
    what it writes, and replaces that folder on the next run."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("hi")
    with pytest.raises(ParameterError, match="already holds files"):
        with core.atomic_dir(foreign, stage="01_data"):
            pytest.fail("no work may start in a foreign folder")
    assert (foreign / "keep.txt").read_text() == "hi"
    ours = tmp_path / "ours"
    with core.atomic_dir(ours, stage="01_data") as scratch:
        (scratch / "a.txt").write_text("1")
    assert core.output_owner(ours) == "01_data"
    with core.atomic_dir(ours, stage="01_data") as scratch:
        (scratch / "b.txt").write_text("2")
    assert sorted(p.name for p in ours.iterdir()) == [OUTPUT_MARKER, "b.txt"]
    with pytest.raises(ParameterError, match="output folder of stage 01_data"):
        with core.atomic_dir(ours, stage="03_eval"):
            pass
    # a folder that turned foreign while the stage worked is not replaced either
    late = tmp_path / "late"
    with pytest.raises(ParameterError, match="already holds files"):
        with core.atomic_dir(late, stage="01_data"):
            late.mkdir()
            (late / "keep.txt").write_text("hi")
    assert (late / "keep.txt").read_text() == "hi" and not list(tmp_path.glob(".late.tmp-*"))


def test_output_folder_rules(tmp_path):
    problem = core.output_dir_problem
    assert problem(tmp_path / "new" / "deeper", "03_eval") is None
    assert problem(tmp_path, "03_eval") is None  # empty
    core.claim_output_dir(tmp_path / "a", "03_eval")
    assert problem(tmp_path / "a", "03_eval") is None
    assert "output folder of stage 03_eval" in problem(tmp_path / "a", "05_repgap")
    assert "lies inside" in problem(tmp_path / "a" / "b", "05_repgap")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / OUTPUT_MARKER).write_text("not json")  # a damaged marker proves nothing
    (tmp_path / "c" / "f").write_text("x")
    assert "already holds files" in problem(tmp_path / "c", "03_eval")
    for name in ("data", "tests", "tu_lib", "notebooks", "figures", ".git"):
        assert "repository's own" in problem(ROOT / name, "03_eval"), name
    assert problem(ROOT / "organism", "00_organism") is None  # the committed organism is the rebuild's own
    assert "repository's own organism/" in problem(ROOT / "organism", "02_unlearn")
    assert "holds it" in problem(ROOT.parent, "01_data") and "is the repository" in problem(ROOT, "01_data")


def test_the_organism_rebuild_refuses_a_foreign_parts_dir_before_training(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("hi")
    monkeypatch.setattr(training_organism, "organism_sets", lambda cfg: pytest.fail("no work may start"))
    with pytest.raises(ParameterError, match="parts_dir=.* already holds files"):
        training_organism.build(out_dir=tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "hi"


# ---- defects 2 and 6: the backbone cache is verified by content ------------------------------------------------


def _fake_backbone_cache(root: Path) -> Path:
    target = root / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"\1" * 4096)
    (target / "config.json").write_text("{}")
    core.write_json(target / "tu_conversion.json",  # with the size older records held: it alone proves nothing
                    {"gguf_sha256": presets_organism.GGUF_SHA256, "size": 4096, "files": core.file_hashes(target)})
    return target


def _conversion_attempted(monkeypatch) -> list:
    calls = []

    def fake_gguf():
        calls.append(1)
        raise TuError("conversion started")
    monkeypatch.setattr(presets_organism, "gguf_path", fake_gguf)
    return calls


def test_a_zeroed_backbone_cache_of_the_right_size_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TU_CACHE_DIR", str(tmp_path))
    target = _fake_backbone_cache(tmp_path)
    calls = _conversion_attempted(monkeypatch)
    assert presets_organism.backbone_dir() == target and not calls  # intact: used as it is
    with open(target / "model.safetensors", "r+b") as f:  # same size, zeroed content (the 4 MB, scaled)
        f.write(b"\0" * 1024)
    os.utime(target / "model.safetensors", ns=(1, 1))  # even with a timestamp that looks old
    with pytest.raises(TuError, match="conversion started"):
        presets_organism.backbone_dir()
    assert calls and "model.safetensors missing or changed since it was written; rebuilding it" in capsys.readouterr().out


@pytest.mark.parametrize("record", ["{not json", "[]", json.dumps({"gguf_sha256": presets_organism.GGUF_SHA256, "size": 4096})])
def test_a_damaged_or_old_conversion_record_means_a_rebuild(record, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TU_CACHE_DIR", str(tmp_path))
    target = _fake_backbone_cache(tmp_path)
    (target / "tu_conversion.json").write_text(record)
    calls = _conversion_attempted(monkeypatch)
    with pytest.raises(TuError, match="conversion started"):  # a rebuild, not a raw JSONDecodeError
        presets_organism.backbone_dir()
    assert calls and "rebuilding it from the GGUF file" in capsys.readouterr().out


# ---- defects 4, 5, 7, 8: seeds, long paths, figure folders ------------------------------------------------------


@pytest.mark.parametrize("spec", [organism.SPEC, curate.SPEC, *[__import__(f"tu_lib.stages.{m}", fromlist=["SPEC"]).SPEC
                                                                for m in ("unlearn", "evaluate", "cost", "repgap", "assignment")]],
                         ids=lambda s: s.notebook)
def test_every_notebook_checks_seeds_paths_and_numbers_with_the_shared_checks(spec):
    for p in spec.params:
        if p.name == "seed":
            assert p.check is params.seed_value, f"{spec.notebook}: seed must use the shared seed check"
        if p.name.endswith("_dir"):
            assert p.kind or p.folder, f"{spec.notebook}: {p.name} must be checked as a path"
        numeric = (int in p.types or float in p.types) and bool not in p.types
        checked_after = {("05_repgap", "combined_alpha"), ("06_assignment", "alpha"), ("06_assignment", "layer")}
        if numeric and (spec.notebook, p.name) not in checked_after:
            assert p.check is not None, f"{spec.notebook}: {p.name} has no range check"


def test_seeds_at_the_bounds_work_in_every_library():
    import random

    import torch

    assert params.seed_value(params.SEED_MAX) is None and params.seed_value(params.SEED_MAX + 1)
    np.random.RandomState(params.SEED_MAX)
    np.random.default_rng(params.SEED_MAX)
    torch.manual_seed(params.SEED_MAX)
    random.seed(params.SEED_MAX)


def test_figures_follow_an_explicit_out_dir(tmp_path):
    P = params.resolve(curate.SPEC, {"profile": "smoke", "out_dir": str(tmp_path / "x")})
    assert P["fig_dir"] == f"{tmp_path / 'x'}/figures"  # not runs/smoke/figures, another run's
    P = params.resolve(curate.SPEC, {"profile": "smoke"})
    assert P["fig_dir"] == "runs/smoke/figures"
    P = params.resolve(curate.SPEC, {"profile": "smoke", "out_dir": "runs/smoke/01_data"})  # the profile's own
    assert P["fig_dir"] == "runs/smoke/figures"
    P = params.resolve(curate.SPEC, {"profile": "smoke", "out_dir": str(tmp_path / "x"), "fig_dir": str(tmp_path / "f")})
    assert P["fig_dir"] == str(tmp_path / "f")


def test_an_over_long_path_is_refused_by_name(tmp_path):
    deep = "/".join(["d" * 200] * 25)  # every name fits, the whole path does not
    with pytest.raises(ParameterError, match=r"out_dir=.* bytes long; this file system takes 4096"):
        params.resolve(curate.SPEC, {"profile": "smoke", "out_dir": str(tmp_path / deep)})
    assert params.path_problem(str(tmp_path / ("n" * 240))) and params.path_problem(str(tmp_path / ("n" * 240)), headroom=False) is None


# ---- defect 9: rates of 0/1 outcomes only -----------------------------------------------------------------------


@pytest.mark.parametrize("outcomes", [[2, 3, -1], [0.5, 1], [1, float("nan")], [[0, 1], [1, 0]], ["a", "b"]])
def test_a_rate_of_anything_but_0_1_outcomes_is_refused(outcomes):
    with pytest.raises(ValueError, match="0/1 outcomes"):
        stats.rate(outcomes)


def test_a_rate_of_flags():
    r = stats.rate([True, False, True, True])
    assert r["rate"] == 0.75 and r["n"] == 4 and 0 <= r["ci_low"] <= 0.75 <= r["ci_high"] <= 1
    assert stats.rate(np.array([], dtype=bool))["n"] == 0
