"""The statistics claims are graded with: paired differences over seeds, t-intervals, Holm's correction.

A method beats another at one NFE when the paired differences (same distillation seed, same draws, same sampling
noise) have a 95% interval that excludes zero in its favour; across the NFEs of one claim the p-values are Holm-
corrected (Holm 1979), so a claim "at every NFE" holds at family-wise level 5%.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def paired(a: dict, b: dict) -> np.ndarray:
    """Per-seed differences a[seed] - b[seed] over the seeds both have (finite values only)."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None
                   and math.isfinite(a[s]) and math.isfinite(b[s]))
    return np.asarray([a[s] - b[s] for s in seeds], dtype=float)


def t_interval(diffs: np.ndarray, level: float = 0.95) -> dict:
    """Mean, the two-sided t-interval of the mean, and the two-sided p-value of 'mean = 0'."""
    n = int(diffs.size)
    if n < 2:
        return {"n": n, "mean": float(diffs.mean()) if n else float("nan"), "low": float("nan"),
                "high": float("nan"), "p": float("nan")}
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * se
    p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else float(2 * sps.t.sf(abs(mean) / se, n - 1)))
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "p": p}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone), in the input order; NaN stays NaN."""
    idx = [i for i, p in enumerate(pvalues) if math.isfinite(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adjusted = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(interval: dict, direction: str, p_adjusted: float, alpha: float = 0.05) -> str:
    """'win' / 'loss' for the first method when the Holm-adjusted test rejects, else 'tie' (no evidence either way).

    direction: 'lower' when a smaller metric is better (the difference a - b must be < 0 for a win)."""
    if not math.isfinite(p_adjusted) or p_adjusted >= alpha:
        return "tie"
    favourable = interval["mean"] < 0 if direction == "lower" else interval["mean"] > 0
    return "win" if favourable else "loss"


def bootstrap_interval(values: np.ndarray, statistic=np.mean, draws: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over resamples of `values`."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=float)
    boots = [statistic(values[rng.integers(0, values.size, values.size)]) for _ in range(draws)]
    return float(np.quantile(boots, 0.5 - level / 2)), float(np.quantile(boots, 0.5 + level / 2))
