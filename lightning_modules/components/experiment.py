"""Results of a multi-seed experiment: per-seed metrics, intervals, paired tests, report, plot.

An experiment directory holds one pipeline run per row and seed,
``<out>/runs/<row>/seed<k>/`` (see ``cli.py experiment``). :func:`collect_results` reads each
run's compared stage (``stage.json`` and ``ranks_<split>.npy``) and computes, per row, split and
metric, the per-seed values with a t-interval over seeds, and against the reference row the
paired bootstrap over test users with the seeds pooled (the same seed of both rows is paired:
same split, same users).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_modules.components.artifacts import read_json, stage_complete, stage_dir
from lightning_modules.components.report import partial_note
from lightning_modules.components.statistics import (
    paired_bootstrap,
    per_user_metrics,
    t_interval,
)

SPLITS = ("valid", "test")


def run_dir_of(out: Path, row: str, seed: int) -> Path:
    return Path(out) / "runs" / row / f"seed{seed}"


def collect_results(out: Path, spec: dict, rows: list[dict], seeds: list[int],
                    resamples: int = 1000) -> dict:
    """``results.json`` content; rows whose compared stage is missing for a seed are listed
    under ``incomplete`` and left out of the statistics."""
    out = Path(out)
    reference = spec.get("reference") or rows[0]["name"]
    table, incomplete = {}, []
    ranks: dict[str, dict[str, dict]] = {split: {} for split in SPLITS}  # split -> row -> seed
    for row in rows:
        if row.get("skip"):
            continue
        name, stage = row["name"], row["compare"]
        per_seed, rank_files = {}, {split: {} for split in SPLITS}
        for seed in seeds:
            run = run_dir_of(out, name, seed)
            if not stage_complete(run, stage):
                incomplete.append({"row": name, "seed": seed, "stage": stage})
                continue
            record = read_json(stage_dir(run, stage) / "stage.json")
            per_seed[seed] = record
            for split in SPLITS:
                path = stage_dir(run, stage) / f"ranks_{split}.npy"
                if path.exists():
                    rank_files[split][seed] = np.load(path)
        if not per_seed:
            continue
        entry = {"stage": stage, "seeds": sorted(per_seed),
                 "commits": sorted({str(r.get("commit")) for r in per_seed.values()})}
        partial = [r["evaluated_users"] for r in per_seed.values()
                   if (r.get("evaluated_users") or {}).get("partial")]
        if partial:  # a slice or a limited evaluation: not comparable with full runs
            entry["evaluated_users"] = partial[0]
        for split in SPLITS:
            metrics = sorted({m for r in per_seed.values() for m in (r.get(split) or {})})
            entry[split] = {m: t_interval([per_seed[s][split][m] for s in sorted(per_seed)
                                           if m in (per_seed[s].get(split) or {})])
                            for m in metrics}
        table[name] = entry
        for split in SPLITS:
            ranks[split][name] = rank_files[split]

    def against_reference(by_row: dict) -> dict:
        if reference not in by_row:
            return {}
        comps = {name: _paired(by_row[name], by_row[reference], table[name], name, reference,
                               resamples) for name in by_row if name != reference}
        return {name: comp for name, comp in comps.items() if comp is not None}

    out_dict = {"name": spec.get("name", ""), "reference": reference, "seeds": seeds,
                "rows": table, "paired_vs_reference": against_reference(ranks["test"]),
                # The same on validation users: what a choice between rows may look at.
                "paired_vs_reference_valid": against_reference(ranks["valid"]),
                "incomplete": incomplete,
                "skipped": {r["name"]: str(r["skip"]) for r in rows if r.get("skip")},
                "compute_seconds": _compute_seconds(out, rows, seeds)}
    if spec.get("steps"):
        # A ladder: every row also against the row above it, on test and (what a choice
        # between two adjacent rows may use) on validation.
        for split, key in (("test", "paired_vs_previous"), ("valid", "paired_vs_previous_valid")):
            by_row = ranks[split]
            done = [r["name"] for r in rows if r["name"] in by_row]
            steps = {}
            for above, name in zip(done, done[1:]):
                got = _paired(by_row[name], by_row[above], table[name], name, above, resamples)
                if got is not None:
                    steps[name] = {"against": above, **got}
            out_dict[key] = steps
    return out_dict


def _paired(mine_files: dict, ref_files: dict, entry: dict, name: str, reference: str,
            resamples: int) -> dict | None:
    """Paired bootstrap of row ``name`` against row ``reference`` over the users of one split
    (the rank files given), the seeds both have pooled; ``None`` when they share no seed."""
    common = sorted(set(mine_files) & set(ref_files))
    if not common:
        return None
    if any(len(mine_files[s]) != len(ref_files[s]) for s in common):
        raise ValueError(f"rows {name} and {reference} ranked different user sets")
    ks = _ks(entry)
    mine = [per_user_metrics(mine_files[s], ks) for s in common]
    ref = [per_user_metrics(ref_files[s], ks) for s in common]
    out = {metric: paired_bootstrap(np.concatenate([m[metric] for m in mine]),
                                    np.concatenate([r[metric] for r in ref]),
                                    resamples=resamples, seed=0)
           for metric in mine[0]}
    out["seeds"] = common
    # The bootstrap above holds each seed's trained model fixed; the spread between training
    # runs shows only in the per-seed differences: their t-interval over the seeds.
    out["over_seeds"] = {metric: t_interval([float(m[metric].mean() - r[metric].mean())
                                             for m, r in zip(mine, ref)])
                         for metric in mine[0]}
    return out


def _compute_seconds(out: Path, rows: list[dict], seeds: list[int]) -> float:
    """Stage seconds spent on this experiment's runs (copied stages count once, where run)."""
    total = 0.0
    for row in rows:
        for seed in seeds:
            run = run_dir_of(out, row["name"], seed)
            for marker in run.glob("*/stage.json") if run.is_dir() else []:
                record = read_json(marker)
                if not record.get("reused_from"):
                    total += float(record.get("seconds") or 0.0)
    return round(total, 1)


def _ks(entry: dict) -> list[int]:
    return sorted({int(m.split("@")[1]) for m in entry.get("test", {}) if "@" in m}) or [5, 10]


def _cell(stat: dict) -> str:
    if stat["half_width"] is None:
        return f"{stat['mean']:.4f}"
    return f"{stat['mean']:.4f} ± {stat['half_width']:.4f}"


def _metric_order(name: str) -> tuple:
    kind, _, k = name.partition("@")
    return (kind != "recall", kind, int(k) if k.isdigit() else 0)


def render_markdown(results: dict) -> str:
    rows = results["rows"]
    metrics = sorted({m for e in rows.values() for m in e.get("test", {})}, key=_metric_order)
    n = len(results["seeds"])
    commits = sorted({c for e in rows.values() for c in e.get("commits", [])})
    cost = [f"{results['compute_seconds']:,.0f} s of stage time (stages shared by rows "
            "counted once)"] if results.get("compute_seconds") is not None else []
    if results.get("wall_seconds") is not None:
        cost.append(f"{results['wall_seconds']:,.0f} s of wall time")
    lines = [f"# {results['name'] or 'Experiment'}", "",
             f"Mean ± 95% half-width over seeds ({n} seed{'s' if n != 1 else ''}: "
             f"{', '.join(map(str, results['seeds']))}). Δ = paired difference against "
             f"**{results['reference']}** over test users (seeds pooled, bootstrap 95% "
             "interval, p-value); **bold** where the interval excludes 0.", ""]
    if cost or commits:
        lines += ["; ".join(cost + ([f"stages made with commit{'s' if len(commits) > 1 else ''} "
                                     + ", ".join(commits)] if commits else [])) + ".", ""]
    for split in SPLITS:
        lines += [f"## {split}", "", "| row | stage | " + " | ".join(metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for name, entry in rows.items():
            cells = [_cell(entry[split][m]) if m in entry.get(split, {}) else "—"
                     for m in metrics]
            stage = entry["stage"] + partial_note(split, entry.get("evaluated_users"))
            lines.append(f"| {name} | {stage} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _diff_table(results["paired_vs_reference"], metrics,
                         f"test: difference against {results['reference']}")
    lines += _seed_table(results["paired_vs_reference"], metrics,
                         f"test: difference against {results['reference']} over seeds")
    if results.get("paired_vs_previous"):
        lines += _diff_table(results["paired_vs_previous"], metrics,
                             "test: difference against the row above", against=True)
    lines += _diff_table(results.get("paired_vs_reference_valid") or {}, metrics,
                         f"valid: difference against {results['reference']} (what a choice "
                         "between rows may use)")
    if results.get("paired_vs_previous_valid"):
        lines += _diff_table(results["paired_vs_previous_valid"], metrics,
                             "valid: difference against the row above", against=True)
    if results.get("skipped"):
        lines += ["Rows not run: " + "; ".join(f"{k} ({v})" for k, v in
                                                results["skipped"].items()), ""]
    if results["incomplete"]:
        lines += ["Incomplete runs (left out): " + ", ".join(
            f"{i['row']}/seed{i['seed']} ({i['stage']})" for i in results["incomplete"]), ""]
    return "\n".join(lines)


def _diff_table(comps: dict, metrics: list[str], title: str, against: bool = False) -> list[str]:
    def cell(c: dict) -> str:
        text = (f"{c['mean_diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] "
                f"p={c['p_value']:.3f}")
        return f"**{text}**" if c["excludes_zero"] else text

    return _table(comps, metrics, title, cell, against=against)


def _seed_table(comps: dict, metrics: list[str], title: str) -> list[str]:
    """Per-seed mean differences with a t-interval over the seeds: the run-to-run spread of
    training, which the user-level bootstrap (seeds pooled) does not see."""
    def cell(c: dict) -> str:
        if c["half_width"] is None:
            return f"{c['mean']:+.4f}"
        text = f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
        return f"**{text}**" if c["low"] > 0 or c["high"] < 0 else text

    intro = ("Mean of the per-seed differences of the row means, 95% t-interval over the "
             "seeds (wide with few seeds; a difference that the user bootstrap finds and this "
             "interval does not may be training noise).")
    return _table({n: c["over_seeds"] for n, c in comps.items() if c.get("over_seeds")},
                  metrics, title, cell, intro=intro)


def _table(comps: dict, metrics: list[str], title: str, cell, intro: str | None = None,
           against: bool = False) -> list[str]:
    """A markdown table of one comparison per row, ``cell(stat)`` per metric ("—" if absent)."""
    if not comps:
        return []
    lines = [f"## {title}", ""] + ([intro, ""] if intro else []) + [
        "| row | " + ("against | " if against else "") + " | ".join(metrics) + " |",
        "|---|" + ("---|" if against else "") + "---|" * len(metrics)]
    for name, comp in comps.items():
        cells = ["—" if comp.get(m) is None else cell(comp[m]) for m in metrics]
        lines.append(f"| {name} | " + (f"{comp['against']} | " if against else "")
                     + " | ".join(cells) + " |")
    return lines + [""]


def plot_means(results: dict, path: Path, metric: str = "ndcg@10") -> Path | None:
    """Bar chart of the rows' test means of ``metric`` with their 95% intervals (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, e["test"][metric]) for n, e in results["rows"].items()
            if metric in e.get("test", {})]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1), 3.2), dpi=120)
    means = [s["mean"] for _, s in rows]
    errs = [s["half_width"] or 0.0 for _, s in rows]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(rows)), [n for n, _ in rows], rotation=20, ha="right")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{results['name'] or 'experiment'}: mean ± 95% interval")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
