"""Rates with uncertainty: every reported rate carries its n and a 95% bootstrap interval."""
from __future__ import annotations

import numpy as np


def binary_outcomes(outcomes) -> np.ndarray:
    """`outcomes` as a float array of 0/1 values; anything else (2, -1, 0.5, NaN, a table) is refused, since a
    rate of it would be a number outside [0, 1] with a meaningless interval."""
    try:
        x = np.asarray(outcomes, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"a rate needs 0/1 outcomes (or booleans); got {outcomes!r:.80}") from e
    if x.ndim != 1:
        raise ValueError(f"a rate needs a flat sequence of 0/1 outcomes; got an array of shape {x.shape}")
    bad = x[(x != 0) & (x != 1)]
    if bad.size:
        raise ValueError(f"a rate needs 0/1 outcomes (or booleans); got {bad.size} other value(s), e.g. "
                         f"{sorted(set(bad.tolist()), key=str)[:5]}: pass per-item success flags, not counts or scores")
    return x


def bootstrap_ci(outcomes, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes (seeded, so reruns print the same)."""
    x = binary_outcomes(outcomes)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def rate(outcomes, seed: int = 0) -> dict:
    """{'rate', 'n', 'ci_low', 'ci_high'} for 0/1 outcomes."""
    x = binary_outcomes(outcomes)
    lo, hi = bootstrap_ci(x, seed=seed)
    return {"rate": float(x.mean()) if x.size else float("nan"), "n": int(x.size), "ci_low": lo, "ci_high": hi}


def fmt_rate(r: dict) -> str:
    return f"{100 * r['rate']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] (n={r['n']})"


def paired_difference(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of a - b over the same items (0/1 outcomes of two conditions on each item), with a paired percentile
    bootstrap interval: items are resampled together, so the interval is of the within-item difference."""
    x, y = binary_outcomes(a), binary_outcomes(b)
    if x.shape != y.shape:
        raise ValueError(f"a paired difference needs outcomes on the same items; got {x.size} and {y.size}")
    d = x - y
    if d.size == 0:
        return {"difference": float("nan"), "n": 0, "ci_low": float("nan"), "ci_high": float("nan")}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"difference": float(d.mean()), "n": int(d.size), "ci_low": float(lo), "ci_high": float(hi)}
