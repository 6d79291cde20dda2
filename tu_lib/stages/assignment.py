"""Notebook 06, the course assignment: graded checks of three student implementations, and the reference
implementations that solution mode fills in (tu_lib's own code, so the checks grade against what the package runs).

Each check raises AssertionError with a message that says what is wrong and what to revisit; they test behaviour
(signs of gradients, directions of KL, coverage of intervals, a gap that closes), not only numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..analysis.cmrm import cmrm
from ..analysis.repgap import check_alphas, check_layers, gap_metrics, hidden_states, mean_shift, meaningless_image
from ..core import params
from ..core.params import Param, Spec, positive, seed_value
from ..core.stats import bootstrap_ci
from ..data.titles import benign_titles
from ..models.generate import generate
from ..render.pages import FIGSTEP_TEXT_PROMPT
from ..training.batches import kl_to_reference

__all__ = ["SPEC", "resolve_params", "anchor_states", "solution_unlearning_loss", "solution_bootstrap_ci",
           "solution_cmrm_shift", "solution_cmrm_correct", "check_unlearning_loss", "check_bootstrap_ci", "check_cmrm", "toy_unlearning_run",
           "FIGSTEP_TEXT_PROMPT", "benign_titles", "cmrm", "generate"]


NOTEBOOK = "06_assignment"


def _spec():
    return Spec(NOTEBOOK, [
        Param("profile", (str,), "default", "settings profile (the assignment reads none; kept for `make` loops)"),
        Param("solution", (bool,), False, "True fills the three exercises with tu_lib's reference code (instructors, CI)"),
        Param("preset", (str,), "organism", "model preset for exercise (c): organism (CPU) or micro (seconds, random weights)"),
        Param("layer", (int,), 15, "decoder layer whose hidden states CMRM corrects in exercise (c)"),
        Param("n_anchor", (int,), 16, "anchor prompts (benign training titles) of the CMRM shift", positive),
        Param("alpha", (float,), 1.0, "CMRM strength used in the demonstration (0 to 2)"),
        Param("seed", (int,), 0, "seed of the toy run and the bootstrap", seed_value),
    ])


SPEC = _spec()


def resolve_params(namespace: dict) -> dict:
    """Typed, checked parameters (alpha in [0, 2]; the layer is checked once the model is loaded)."""
    P = params.resolve(SPEC, namespace)  # an int alpha (`-p alpha 1`) arrives as a float
    P["alpha"] = check_alphas([P["alpha"]])[0]
    return P


def anchor_states(vlm, P: dict):
    """(with blank image, text only) hidden states (n_anchor, d) at P['layer'] of benign training titles."""
    layer = check_layers(vlm, [P["layer"]])
    titles = benign_titles(P["seed"])[0][: P["n_anchor"]]
    blank = meaningless_image(vlm, "blank")
    with_image = hidden_states(vlm, [vlm.chat(t, True) for t in titles], [blank] * len(titles), layer)[:, 0]
    text = hidden_states(vlm, [vlm.chat(t, False) for t in titles], None, layer)[:, 0]
    return with_image, text


# ---------------------------------------------------------------------------------------------
# reference implementations (solution mode)


def solution_unlearning_loss(forget_nll, mismatch_nll, logits, reference_logits, ga_weight=0.5, mismatch_weight=1.0,
                             kl_weight=1.0):
    """Yao et al.: -ga_weight * NLL(harmful answer) + mismatch_weight * NLL(random normal answer)
    + kl_weight * KL(reference || current) on normal data; tu_lib.methods.base.step_loss's terms."""
    return -ga_weight * forget_nll + mismatch_weight * mismatch_nll + kl_weight * kl_to_reference(logits, reference_logits)


def solution_bootstrap_ci(outcomes, n_boot=2000, level=0.95, seed=0):
    return bootstrap_ci(outcomes, n_boot=n_boot, level=level, seed=seed)


def solution_cmrm_shift(with_image, text):
    return mean_shift(np.asarray(with_image), np.asarray(text))


def solution_cmrm_correct(hidden, shift, alpha):
    return np.asarray(hidden) - alpha * np.asarray(shift)


# ---------------------------------------------------------------------------------------------
# graded checks


def _close(a, b, tol=1e-5) -> bool:
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def check_unlearning_loss(fn) -> str:
    """(a) the unlearning loss: value, gradient signs of each term, and the direction of the KL."""
    g = torch.Generator().manual_seed(0)
    f, m = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    logits = torch.randn(6, 11, generator=g, requires_grad=True)
    ref = torch.randn(6, 11, generator=g)
    loss = fn(f, m, logits, ref)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, "Return one scalar tensor (the loss), not a list or a float."
    loss.backward()
    assert f.grad is not None and _close(f.grad, -0.5), (
        f"d loss / d forget_nll should be -0.5 (gradient *ascent* on the harmful answer, weight 0.5); got {f.grad}.")
    assert m.grad is not None and _close(m.grad, 1.0), (
        f"d loss / d mismatch_nll should be +1 (descent on a random normal answer); got {m.grad}.")
    same = fn(torch.tensor(0.0), torch.tensor(0.0), ref.clone(), ref)
    assert abs(float(same)) < 1e-6, f"With the current logits equal to the reference the KL is 0, so the loss is 0; got {float(same):.4g}."
    # the reference is the target: KL(ref || cur), not KL(cur || ref)
    peaked, flat = torch.tensor([[6.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 4)
    forward = float(fn(torch.tensor(0.0), torch.tensor(0.0), peaked, flat))
    p, q = torch.softmax(flat, -1), torch.softmax(peaked, -1)
    expect = float((p * (p.log() - q.log())).sum())
    assert _close(forward, expect, 1e-4), (
        f"KL term: expected KL(reference || current) = {expect:.4f} for a flat reference and a peaked current "
        f"distribution, got {forward:.4f}. Check the direction and that you use log-softmax, not raw logits.")
    many = fn(torch.tensor(1.0), torch.tensor(1.0), logits.detach(), ref)
    expect = solution_unlearning_loss(torch.tensor(1.0), torch.tensor(1.0), logits.detach(), ref)
    assert _close(many, expect, 1e-4), (
        f"KL over several positions should be the mean over positions (rows), got loss {float(many):.4f}, expected "
        f"{float(expect):.4f}.")
    return "(a) unlearning loss: all checks passed"


def check_bootstrap_ci(fn) -> str:
    """(b) a 95% percentile bootstrap interval of an ASR (0/1 outcomes)."""
    rng = np.random.default_rng(1)
    x = (rng.random(50) < 0.3).astype(int)
    # determinism first: an unseeded bootstrap would otherwise fail a later check by chance, with a misleading hint
    # (many outcomes, so intervals from different random streams differ: with 50 they often coincide by chance)
    big = (rng.random(997) < 0.3).astype(int)
    runs = {tuple(float(v) for v in fn(big, seed=3)) for _ in range(3)}
    assert len(runs) == 1, "Use the seed: the same seed must give the same interval (reports must rerun)."
    lo, hi = (float(v) for v in fn(x, seed=0))
    assert 0 <= lo <= x.mean() <= hi <= 1, f"The interval ({lo}, {hi}) must lie in [0, 1] and contain the rate {x.mean()}."
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert abs((hi - lo) - 2 * half) < 0.06, (
        f"Width {hi - lo:.3f} is far from the normal approximation {2 * half:.3f}: resample the outcomes *with "
        f"replacement* (same size), take the mean of each resample, and the 2.5% and 97.5% quantiles of those means.")
    assert tuple(fn(np.zeros(20, int), seed=0)) == (0.0, 0.0), "All-zero outcomes: every resample has rate 0, so the interval is (0, 0)."
    wide, narrow = fn(np.r_[np.ones(10), np.zeros(10)], seed=0), fn(np.r_[np.ones(200), np.zeros(200)], seed=0)
    assert (narrow[1] - narrow[0]) < 0.5 * (wide[1] - wide[0]), "More outcomes must give a narrower interval (n=400 vs n=20)."
    lo90, hi90 = fn(x, level=0.90, seed=0)
    assert lo <= lo90 and hi90 <= hi and (hi90 - lo90) < (hi - lo), "A 90% interval must sit inside the 95% one."
    return "(b) bootstrap CI: all checks passed"


def check_cmrm(shift_fn, correct_fn, with_image: np.ndarray, text: np.ndarray) -> str:
    """(c) CMRM on real hidden states (n, d) of the same prompts with and without a meaningless image (n >= 4)."""
    v = np.asarray(shift_fn(with_image, text))
    assert v.shape == (text.shape[1],), f"The shift vector is one hidden-size vector, shape ({text.shape[1]},); got {v.shape}."
    expect = solution_cmrm_shift(with_image, text)
    assert np.allclose(v, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max()), (
        "The shift is the mean over prompts of (state with image - state without); check the sign and the axis.")
    assert np.array_equal(np.asarray(correct_fn(with_image, v, 0.0)), with_image), "alpha = 0 must leave the states unchanged."
    # held out: the shift of the first half of the prompts, applied to the second half
    half = len(text) // 2
    v_half = np.asarray(shift_fn(with_image[:half], text[:half]))
    before = gap_metrics(with_image[half:], text[half:])["normalised_distance"]
    after = gap_metrics(np.asarray(correct_fn(with_image[half:], v_half, 1.0)), text[half:])["normalised_distance"]
    assert after < 0.5 * before, (
        f"Correcting held-out prompts with alpha = 1 should at least halve the gap between image and text states "
        f"(normalised distance {before:.2f} -> {after:.2f}); subtract alpha * shift, do not add it.")
    return f"(c) CMRM: all checks passed (held-out prompts: normalised distance to text {before:.2f} -> {after:.2f})"


def toy_unlearning_run(fn, steps: int = 60, lr: float = 0.2, seed: int = 0):
    """Optimise free logits with the student's loss: the harmful answer's NLL should rise, the mismatch NLL fall,
    and the KL on 'normal' positions stay bounded (a shared bias couples the terms) — the recipe's terms moving as
    described, and why ascent needs a stop rule (the forget NLL grows without limit)."""
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    vocab, harmful, mismatch = 12, 3, 7
    shared = torch.zeros(vocab, requires_grad=True)  # a bias every position shares, so the terms pull on it together
    forget_logits = torch.randn(1, vocab, generator=g).requires_grad_()
    mismatch_logits = torch.randn(1, vocab, generator=g).requires_grad_()
    normal = torch.randn(5, vocab, generator=g)
    normal_logits = normal.clone().requires_grad_()
    opt = torch.optim.SGD([shared, forget_logits, mismatch_logits, normal_logits], lr=lr)
    rows = []
    for step in range(steps + 1):
        f_nll = torch.nn.functional.cross_entropy(forget_logits + shared, torch.tensor([harmful]))
        m_nll = torch.nn.functional.cross_entropy(mismatch_logits + shared, torch.tensor([mismatch]))
        loss = fn(f_nll, m_nll, normal_logits + shared, normal)
        kl = float(solution_unlearning_loss(torch.tensor(0.0), torch.tensor(0.0), (normal_logits + shared).detach(), normal))
        rows.append({"step": step, "forget_nll": f_nll.item(), "mismatch_nll": m_nll.item(), "kl": kl, "loss": loss.item()})
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return pd.DataFrame(rows)
