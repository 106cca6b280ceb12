"""Where two models differ: per-user metrics split into groups of users.

A mean NDCG@10 hides where a model wins and where it loses. :func:`breakdown_table` groups
the users of an evaluated split by a per-user key (how often the target item occurs in the
training sequences, or how long the user's history is), gives each stage's mean metric per
group and the paired difference against a reference stage with its bootstrap interval.

* :func:`quantile_groups`: integer ranges that split the users into groups of about equal size;
* :func:`breakdown_table`: the table (one dict per group, then one for all users);
* :func:`render_breakdown`: the table as markdown.
"""

from __future__ import annotations

import numpy as np

from lightning_modules.components.statistics import paired_bootstrap


def quantile_groups(values, groups: int) -> list[tuple[int, int]]:
    """Inclusive integer ranges ``[(low, high), ...]`` that split ``values`` into at most
    ``groups`` groups of about equal size (fewer when many values are equal: a value is never
    split between two groups). The ranges cover ``min(values)..max(values)``."""
    v = np.sort(np.asarray(values, dtype=np.int64))
    if v.size == 0:
        raise ValueError("quantile_groups needs at least one value")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    cuts = sorted({int(v[min(v.size - 1, (v.size * g) // groups)]) for g in range(1, groups)})
    lows = [int(v[0])] + [c for c in cuts if c > v[0]]
    highs = [c - 1 for c in lows[1:]] + [int(v[-1])]
    return list(zip(lows, highs))


def breakdown_table(keys, metrics: dict[str, np.ndarray], reference: str,
                    ranges: list[tuple[int, int]], resamples: int = 1000,
                    seed: int = 0) -> list[dict]:
    """One dict per range of ``keys`` and a last one for all users:
    ``{"group": "low-high" | "all", "low", "high", "users", "share", "means": {stage: mean},
    "diff": {stage: paired_bootstrap(stage, reference)}}``.

    ``keys[i]`` is user ``i``'s key and ``metrics[stage][i]`` their metric (the same users in
    the same order for every stage; rows of several seeds may be stacked). A group without
    users has ``users`` 0 and no means."""
    keys = np.asarray(keys, dtype=np.int64)
    if reference not in metrics:
        raise ValueError(f"reference stage {reference!r} is not among {sorted(metrics)}")
    for stage, values in metrics.items():
        if np.shape(values) != keys.shape:
            raise ValueError(f"stage {stage!r}: {np.shape(values)} metric values for "
                             f"{keys.shape} users")
    out = []
    spans = [(lo, hi, f"{lo}-{hi}" if hi > lo else str(lo)) for lo, hi in ranges]
    for lo, hi, label in [*spans, (None, None, "all")]:
        mask = np.ones(keys.shape, bool) if lo is None else (keys >= lo) & (keys <= hi)
        n = int(mask.sum())
        row = {"group": label, "low": lo, "high": hi, "users": n,
               "share": n / max(1, keys.size), "means": {}, "diff": {}}
        if n:
            row["means"] = {s: float(np.mean(m[mask])) for s, m in metrics.items()}
            row["diff"] = {s: paired_bootstrap(m[mask], metrics[reference][mask], resamples,
                                               seed)
                           for s, m in metrics.items() if s != reference}
        out.append(row)
    return out


def render_breakdown(table: list[dict], reference: str, key_label: str, metric: str) -> str:
    """Markdown: per group its share of the users, each stage's mean ``metric``, and each
    other stage's difference against ``reference`` with its 95% interval (bold when the
    interval excludes 0) and its ratio."""
    stages = list(next((r["means"] for r in table if r["means"]), {}))
    others = [s for s in stages if s != reference]
    head = [key_label, "users", *[f"{s} {metric}" for s in stages],
            *[f"{s} − {reference}" for s in others], *[f"{s} / {reference}" for s in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        if not r["users"]:
            lines.append(f"| {r['group']} | 0 |" + " |" * (len(head) - 2))
            continue
        cells = [r["group"], f"{r['users']:,} ({r['share']:.0%})"]
        cells += [f"{r['means'][s]:.4f}" for s in stages]
        for s in others:
            d = r["diff"][s]
            text = f"{d['mean_diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            cells.append(f"**{text}**" if d["excludes_zero"] else text)
        for s in others:
            ref = r["means"][reference]
            cells.append(f"{r['means'][s] / ref:.2f}" if ref > 0 else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
