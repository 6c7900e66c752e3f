"""Statistics for paired comparisons of methods on the same evaluation units."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def paired_test(a: list[float], b: list[float], alpha: float = 0.05) -> dict[str, float]:
    """Paired t-test of ``a - b`` over the same units, with a t confidence interval of the mean difference."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {"n": n, "mean_diff": mean, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    sd = float(d.std(ddof=1))
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
        return {"n": n, "mean_diff": mean, "ci_low": mean, "ci_high": mean, "p_value": p}
    half = stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(a, b).pvalue)
    return {"n": n, "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "p_value": p}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        p = p_values[i]
        if math.isnan(p):
            continue
        running = max(running, min(1.0, (len(p_values) - rank) * p))
        adjusted[i] = running
    return adjusted


def stars(p: float) -> str:
    if math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"
