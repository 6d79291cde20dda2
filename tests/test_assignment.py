"""Notebook 06's graded checks: the reference solutions pass, wrong implementations fail with a useful message,
and the notebook itself stops at the check cell when a wrong implementation is filled in."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from notebook_helpers import code_cells

from tu_lib.core import ParameterError, repo_root
from tu_lib.stages import assignment as A


def _states(seed=0, n=12, d=32):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, d))
    return text + 3.0 + rng.normal(scale=0.3, size=(n, d)), text


def test_reference_solutions_pass_every_check():
    assert "passed" in A.check_unlearning_loss(A.solution_unlearning_loss)
    assert "passed" in A.check_bootstrap_ci(A.solution_bootstrap_ci)
    assert "passed" in A.check_cmrm(A.solution_cmrm_shift, A.solution_cmrm_correct, *_states())
    run = A.toy_unlearning_run(A.solution_unlearning_loss, steps=30)
    assert run["forget_nll"].iloc[-1] > 2 * run["forget_nll"].iloc[0]
    assert run["mismatch_nll"].iloc[-1] < run["mismatch_nll"].iloc[0]
    # the KL term is what keeps the normal positions close: without it the same run drifts ~3x further (0.55 vs 1.75)
    no_kl = A.toy_unlearning_run(lambda f, m, lg, ref, *a: -0.5 * f + m, steps=30)
    assert run["kl"].max() < 0.5 * no_kl["kl"].max()


def _kl(cur, ref):
    return (torch.softmax(ref, -1) * (torch.log_softmax(ref, -1) - torch.log_softmax(cur, -1))).sum(-1)


WRONG_LOSSES = {
    "descent on harmful answers": (lambda f, m, lg, ref, *a: 0.5 * f + m + _kl(lg, ref).mean(), "ascent"),
    "KL reversed": (lambda f, m, lg, ref, *a: -0.5 * f + m + _kl(ref, lg).mean(), "direction"),
    "KL summed over positions": (lambda f, m, lg, ref, *a: -0.5 * f + m + _kl(lg, ref).sum(), "mean over positions"),
    "mismatch ignored": (lambda f, m, lg, ref, *a: -0.5 * f + _kl(lg, ref).mean(), "mismatch"),
}


@pytest.mark.parametrize("name", WRONG_LOSSES)
def test_wrong_unlearning_losses_fail_the_check(name):
    fn, hint = WRONG_LOSSES[name]
    with pytest.raises(AssertionError, match=hint):
        A.check_unlearning_loss(fn)


def _no_replacement(outcomes, n_boot=2000, level=0.95, seed=0):
    rng, x = np.random.default_rng(seed), np.asarray(outcomes, float)
    means = [rng.permutation(x).mean() for _ in range(n_boot)]
    return tuple(float(q) for q in np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2]))


def _ignores_level(outcomes, n_boot=2000, level=0.95, seed=0):
    return A.solution_bootstrap_ci(outcomes, n_boot, 0.95, seed)


_fresh_seeds = itertools.count(100)


def _unseeded(outcomes, n_boot=2000, level=0.95, seed=0):
    return A.solution_bootstrap_ci(outcomes, n_boot, level, next(_fresh_seeds))  # a new seed every call, deterministically


@pytest.mark.parametrize("fn,hint", [(_no_replacement, "with replacement"), (_ignores_level, "90%"), (_unseeded, "seed")])
def test_wrong_bootstrap_intervals_fail_the_check(fn, hint):
    with pytest.raises(AssertionError, match=hint):
        A.check_bootstrap_ci(fn)


@pytest.mark.parametrize("shift,correct,hint", [
    (lambda w, t: (t - w).mean(0), A.solution_cmrm_correct, "sign"),
    (lambda w, t: (w - t).mean(1), A.solution_cmrm_correct, "shape"),
    (A.solution_cmrm_shift, lambda h, v, a: np.asarray(h) + a * np.asarray(v), "subtract"),
    (A.solution_cmrm_shift, lambda h, v, a: np.asarray(h) - np.asarray(v), "alpha = 0"),
])
def test_wrong_cmrm_fails_the_check(shift, correct, hint):
    with pytest.raises(AssertionError, match=hint):
        A.check_cmrm(shift, correct, *_states())


def test_bad_parameters_are_rejected():
    for bad, match in (({"alpha": 5.0}, "alpha"), ({"solution": "yes"}, "solution"), ({"n_anchors": 3}, "did you mean 'n_anchor'"),
                       ({"n_anchor": 0}, "n_anchor=0")):
        with pytest.raises(ParameterError, match=match):
            A.resolve_params(bad)
    assert A.resolve_params({"alpha": 1})["alpha"] == 1.0


def _run_notebook(tmp_path, replace: dict[str, str], **parameters):
    import papermill as pm

    nb = json.loads((repo_root() / "notebooks" / "06_assignment.ipynb").read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        for old, new in replace.items():
            src = src.replace(old, new)
        cell["source"] = src
    path = tmp_path / "06.ipynb"
    path.write_text(json.dumps(nb))
    return pm.execute_notebook(str(path), str(tmp_path / "out.ipynb"), parameters=parameters, progress_bar=False,
                               cwd=str(repo_root()))


def test_notebook_grades_a_wrong_implementation_as_failed(tmp_path):
    import papermill as pm

    wrong = {'raise NotImplementedError("exercise (a): implement the unlearning loss")':
             "return 0.5 * forget_nll + mismatch_nll  # wrong: descent on harmful answers, no KL"}
    with pytest.raises(pm.PapermillExecutionError) as err:
        _run_notebook(tmp_path, wrong)
    assert err.value.ename == "AssertionError" and "ascent" in err.value.evalue
    assert "check_unlearning_loss" in err.value.source  # it failed in the graded check, not earlier
    with pytest.raises(pm.PapermillExecutionError) as err:
        _run_notebook(tmp_path, {})  # nothing implemented: the exercise says so
    assert err.value.ename == "NotImplementedError" and "exercise (a)" in err.value.evalue


def test_handed_out_notebook_is_blank_and_its_checked_solution_copy_is_current():
    blank = code_cells(repo_root() / "notebooks" / "06_assignment.ipynb")
    solved = code_cells(repo_root() / "tests" / "nbval" / "06_assignment.solution.ipynb")
    assert not any(c.get("outputs") for c in blank), "students get the notebook without outputs (no solutions shown)"
    # nbval checks the solution copy: it must be the handed-out notebook, executed (rerun `make notebooks` after edits)
    assert ["".join(c["source"]) for c in blank] == ["".join(c["source"]) for c in solved]
    assert sum(bool(c.get("outputs")) for c in solved) >= 6  # every graded check and demonstration printed
