"""``metrics.json`` (schema in the README's protocol section) and ``report.md`` of a run."""

from __future__ import annotations

from pathlib import Path

from lightning_modules.components.artifacts import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    stage_complete,
    stage_dir,
)
from lightning_modules.components.plots import write_plots

SCHEMA_KEYS = ("valid", "test", "evaluated_users", "seconds", "per_stage", "selected")
TOKENIZER_KEYS = ("items", "users", "seconds")  # its validation numbers stay in stage.json
DEFAULT_PROTOCOL = {"split": "leave-one-out", "max_history": 20, "exclude_history": True,
                    "num_beams": 20, "ks": [5, 10]}


def collect(run_dir: str | Path, dataset: str, stage_names: list[str]) -> dict:
    run_dir = Path(run_dir)
    stages, protocol = {}, dict(DEFAULT_PROTOCOL)
    for name in stage_names:
        if not stage_complete(run_dir, name):
            continue
        rec = read_json(stage_dir(run_dir, name) / "stage.json")
        keys = TOKENIZER_KEYS if "items" in rec else SCHEMA_KEYS
        stages[name] = {k: rec[k] for k in keys if k in rec}
        for k, v in (rec.get("protocol") or {}).items():
            protocol[k] = v
        dataset = dataset or rec.get("dataset", "")
    return {"dataset": dataset, "protocol": protocol, "stages": stages}


def _fmt_row(name: str, split: str, metrics: dict, keys: list[str]) -> str:
    return f"| {name} | {split} | " + " | ".join(
        f"{metrics[k]:.4f}" if k in metrics else "—" for k in keys) + " |"


def partial_note(split: str, users: dict | None) -> str:
    """``""``, or `` (300 of 943 users)`` / `` (slice: first 100 users)`` when the split's
    numbers do not cover every user of the dataset."""
    if not users or not users.get("partial"):
        return ""
    parts = []
    if split in users and users[split] < users["of"]:
        parts.append(f"{users[split]} of {users['of']} users")
    if "slice" in users:
        parts.append(f"slice: first {users['slice']} users")
    return f" ({'; '.join(parts)})" if parts else ""


def split_label(split: str, users: dict | None) -> str:
    """``valid``, or ``valid`` with its :func:`partial_note`."""
    return split + partial_note(split, users)


def render_report(metrics: dict, plots: list[str] | None = None) -> str:
    proto = metrics["protocol"]
    ks = proto.get("ks", [5, 10])
    keys = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    lines = [f"# Run report: {metrics['dataset']}", "",
             f"Protocol: chronological leave-one-out, history ≤ {proto.get('max_history')}, "
             f"full-catalogue ranking, history items "
             f"{'excluded' if proto.get('exclude_history') else 'kept'}; generative models rank "
             f"by trie-constrained beam search (beam {proto.get('num_beams')}).", "",
             "## Ranking quality", "",
             "| stage | split | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    stages = metrics["stages"]
    partial = False
    for name, rec in stages.items():
        for split in ("valid", "test"):
            if rec.get(split):
                label = split_label(split, rec.get("evaluated_users"))
                partial = partial or label != split
                lines.append(_fmt_row(name, label, rec[split], keys))
    if partial:
        lines += ["", "Rows marked with a user count or a slice cover part of the users "
                  "only: they do not compare with full rows."]
    tok = stages.get("tokenizer")
    if tok:
        lines += ["", "## Tokenizer", "", "| side | collision rate | utilization per level |",
                  "|---|---|---|"]
        for side in ("items", "users"):
            if side in tok:
                util = ", ".join(f"{u:.3f}" for u in tok[side].get("utilization", []))
                lines.append(f"| {side} | {tok[side].get('collision_rate', 0):.4f} | {util} |")
    dpo = stages.get("dpo")
    if dpo and dpo.get("per_stage"):
        lines += ["", "## Preference stages (validation after each)", "",
                  "| preference stage | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        of = (dpo.get("evaluated_users") or {}).get("of")
        for name, rec in dpo["per_stage"].items():
            valid = rec.get("valid", {})
            if of and rec.get("valid_users", of) < of:  # validation on a sample during fit
                name = f"{name} ({rec['valid_users']} of {of} users)"
            lines.append(f"| {name} | " + " | ".join(
                f"{valid[k]:.4f}" if k in valid else "—" for k in keys) + " |")
        chosen = dpo.get("selected")
        if chosen:
            start, trained = chosen["start_valid"], chosen["trained_valid"]
            lines.append("| starting policy (all users) | " + " | ".join(
                f"{start[k]:.4f}" if k in start else "—" for k in keys) + " |")
            metric = chosen["metric"]
            lines += ["", f"Kept: the **{chosen['policy']}** policy (full validation "
                      f"{metric}: starting {start[metric]:.4f}, best preference epoch "
                      f"{trained[metric]:.4f}; a tie keeps the start). The dpo rows above are "
                      "the kept policy's."]
    lines += ["", "## Wall time", "", "| stage | seconds |", "|---|---|"]
    for name, rec in stages.items():
        if "seconds" in rec:
            lines.append(f"| {name} | {rec['seconds']:.1f} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "TensorBoard curves: `tensorboard --logdir logs` in this folder.", ""]
    return "\n".join(lines)


def write_reports(run_dir: str | Path, dataset: str, stage_names: list[str],
                  plots_enabled: bool = True) -> Path:
    """Rebuild ``metrics.json``, the plots and ``report.md`` (which links them) from the
    finished stages' ``stage.json`` and TensorBoard logs."""
    run_dir = Path(run_dir)
    metrics = collect(run_dir, dataset, stage_names)
    path = atomic_write_json(run_dir / "metrics.json", metrics)
    plots = [] if not plots_enabled else write_plots(run_dir, metrics)
    atomic_write_text(run_dir / "report.md", render_report(
        metrics, [str(p.relative_to(run_dir)) for p in plots]))
    return path
