"""Statistics of experiments: intervals over seeds and paired tests over users.

* :func:`t_interval`: mean, sample std and the Student-t 95% interval of per-seed values;
* :func:`per_user_metrics`: Recall@K / NDCG@K of every user from target ranks (the files the
  evaluating stages write, ``ranks_<split>.npy``);
* :func:`paired_bootstrap`: the mean difference of two systems' per-user values on the same
  users, its percentile-bootstrap interval and a two-sided p-value.
"""

from __future__ import annotations

import math

import numpy as np


def t_interval(values, confidence: float = 0.95) -> dict:
    """``{"values", "mean", "std", "half_width", "low", "high", "n"}`` of per-seed values.

    ``std`` is the sample standard deviation (``ddof=1``); the interval is
    ``mean ± t_{(1+confidence)/2, n-1} * std / sqrt(n)``. With one value the spread is unknown:
    ``std`` and ``half_width`` are ``None``.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    out = {"values": [float(v) for v in x], "mean": mean, "n": int(x.size)}
    if x.size < 2:
        return {**out, "std": None, "half_width": None, "low": None, "high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * std / math.sqrt(x.size))
    return {**out, "std": std, "half_width": half, "low": mean - half, "high": mean + half}


def per_user_metrics(ranks, ks=(5, 10)) -> dict[str, np.ndarray]:
    """``{"recall@k": [U], "ndcg@k": [U]}`` from 0-based target ranks (a huge rank = missed)."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = (r < k).astype(np.float64)
    for k in ks:
        gain = 1.0 / np.log2(np.minimum(r, 1e9) + 2.0)
        out[f"ndcg@{k}"] = np.where(r < k, gain, 0.0)
    return out


def paired_bootstrap(a, b, resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Paired bootstrap of ``mean(a - b)`` over users (``a[i]``, ``b[i]``: the same user).

    Users are resampled with replacement ``resamples`` times (seeded); the interval is the
    percentile interval of the resampled mean differences, and the two-sided p-value is
    ``min(1, 2 * min(P*(d <= 0), P*(d >= 0)))`` under the bootstrap distribution, with the
    usual ``+1`` correction so that it is never exactly 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-D arrays, got {a.shape} "
                         f"and {b.shape}")
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    below = (np.sum(boot <= 0) + 1) / (resamples + 1)
    above = (np.sum(boot >= 0) + 1) / (resamples + 1)
    p = min(1.0, 2 * min(below, above))
    return {"mean_diff": float(d.mean()), "low": float(low), "high": float(high),
            "p_value": float(p), "resamples": int(resamples), "users": int(d.size),
            "excludes_zero": bool(low > 0 or high < 0)}
