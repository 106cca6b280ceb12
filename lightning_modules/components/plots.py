"""PNG plots of a run, linked from its ``report.md`` (matplotlib, headless).

- ``plots/<stage>_curves.png``: training loss and validation NDCG@10 / Recall@10 over training
  steps, read from the stage's TensorBoard events (the latest version folder);
- ``plots/dpo_stages.png``: validation after each preference stage;
- ``plots/tokenizer_codebooks.png``: utilization and perplexity of every code level;
- ``plots/test_metrics.png``: every evaluated stage's test Recall@10 and NDCG@10.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

CURVES = (("train/loss", "training loss"), ("val/ndcg@10", "valid NDCG@10"),
          ("val/recall@10", "valid Recall@10"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _latest_version(folder: Path) -> Path | None:
    versions = [p for p in folder.glob("version_*") if p.is_dir()]
    if not versions:
        return None
    return max(versions, key=lambda p: int(p.name.split("_")[1]) if
               p.name.split("_")[1].isdigit() else -1)


def scalars(log_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``tag -> (steps, values)`` of one TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def stage_curves(run_dir: Path, stage: str, out: Path) -> Path | None:
    version = _latest_version(run_dir / "logs" / stage)
    if version is None:
        return None
    data = scalars(version)
    present = [(tag, label) for tag, label in CURVES if tag in data and data[tag][0]]
    if not any(tag.startswith("val/") for tag, _ in present):
        # No ranking metrics (the tokenizer): its code utilization per level instead.
        present += [(tag, tag[4:]) for tag in sorted(data)
                    if tag.startswith("val/") and "utilization" in tag and data[tag][0]][:6]
    if not present:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    loss = [p for p in present if p[0] == "train/loss"]
    if loss:
        steps, values = data["train/loss"]
        axes[0].plot(steps, values, color="#4C72B0", lw=1)
        axes[0].set_title(f"{stage}: training loss")
        axes[0].set_xlabel("step")
    else:
        axes[0].set_visible(False)
    for tag, label in present:
        if tag.startswith("val/"):
            steps, values = data[tag]
            axes[1].plot(steps, values, marker="o", ms=3, label=label)
    axes[1].set_title(f"{stage}: validation")
    axes[1].set_xlabel("step")
    if axes[1].has_data():
        axes[1].legend(fontsize=8)
    else:
        axes[1].set_visible(False)
    fig.tight_layout()
    path = _save(fig, out / f"{stage}_curves.png")
    plt.close(fig)
    return path


def dpo_stages(per_stage: dict, out: Path) -> Path | None:
    names = [n for n, r in per_stage.items() if (r.get("valid") or {}).get("ndcg@10") is not None]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    for metric in ("ndcg@10", "recall@10"):
        ax.plot(names, [per_stage[n]["valid"].get(metric) for n in names], marker="o",
                label=f"valid {metric}")
    ax.set_title("dpo: validation after each preference stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, out / "dpo_stages.png")
    plt.close(fig)
    return path


def codebooks(stats: dict, out: Path) -> Path | None:
    sides = [s for s in ("items", "users") if s in stats and stats[s].get("levels")]
    if not sides:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    width = 0.8 / len(sides)
    for j, side in enumerate(sides):
        levels = stats[side]["levels"]
        xs = [i + j * width for i in range(len(levels))]
        axes[0].bar(xs, [lv["utilization"] for lv in levels], width, label=side)
        axes[1].bar(xs, [lv["perplexity"] / lv["codebook_size"] for lv in levels], width,
                    label=side)
    for ax, title in zip(axes, ("utilization (share of codes used)",
                                "perplexity / codebook size")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(stats[sides[0]]["levels"]))],
                      [f"level {i}" for i in range(len(stats[sides[0]]["levels"]))])
        ax.set_ylim(0, 1.25)  # headroom: the legend sits above bars that reach 1.0
        ax.set_title(f"tokenizer: {title}", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=len(sides))
    fig.tight_layout()
    path = _save(fig, out / "tokenizer_codebooks.png")
    plt.close(fig)
    return path


def test_metrics(stages: dict, out: Path) -> Path | None:
    rows = [(n, r["test"]) for n, r in stages.items() if r.get("test")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(rows) + 1.5), 3.2), dpi=110)
    width = 0.38
    for j, metric in enumerate(("recall@10", "ndcg@10")):
        ax.bar([i + j * width for i in range(len(rows))], [t.get(metric, 0) for _, t in rows],
               width, label=f"test {metric}")
    ax.set_xticks([i + width / 2 for i in range(len(rows))], [n for n, _ in rows])
    ax.set_title("test metrics per stage (one run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, out / "test_metrics.png")
    plt.close(fig)
    return path


def write_plots(run_dir: str | Path, metrics: dict) -> list[Path]:
    """Every plot the run's finished stages allow, under ``<run_dir>/plots``; a plot that
    fails is logged and left out (plots never fail a run)."""
    from lightning_modules.components.artifacts import read_json

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    stages = metrics.get("stages", {})
    jobs = [lambda s=s: stage_curves(run_dir, s, out) for s in stages if s != "popular"]
    if "dpo" in stages and stages["dpo"].get("per_stage"):
        jobs.append(lambda: dpo_stages(stages["dpo"]["per_stage"], out))
    stats = run_dir / "tokenizer" / "codebook_stats.json"
    if "tokenizer" in stages and stats.exists():
        jobs.append(lambda: codebooks(read_json(stats), out))
    jobs.append(lambda: test_metrics(stages, out))
    made = []
    for job in jobs:
        try:
            path = job()
        except Exception as err:  # noqa: BLE001 - a plot is a convenience, not an artifact
            log.warning("plot skipped: %s: %s", type(err).__name__, err)
            continue
        if path is not None:
            made.append(path)
    return made
