"""Where the time of a pipeline goes, stage by stage.

    python bench/bench_pipeline.py                                   # the main job (ML-100K)
    python bench/bench_pipeline.py --config configs/beauty/pipeline.yaml
    python bench/bench_pipeline.py --profile sft --stages sasrec,tokenizer,sft
    python bench/bench_pipeline.py --run_dir runs/bench --json bench.json \
        --data.init_args.max_users=100

Runs the pipeline YAML into a fresh temporary run directory (or ``--run_dir``; stages already
complete there are reused, not timed again) with ``--threads`` torch threads, then prints per
stage: wall seconds (``stages.<name>.seconds`` of metrics.json), epochs, seconds in training,
in validation during fit, in self-play generation (dpo), in the final validation and test of
the selected checkpoint, and in export; training throughput (rows/s, tokens/s where rows are
token sequences); decoding users/s in validation and test; and the stage's valid/test
metrics. The same goes to ``--json``. ``--profile STAGE`` runs that stage under cProfile and
prints its top functions by own time and by cumulative time.

Any ``--trainer.*``, ``--model.*``, ``--data.*`` flag is passed to every stage, as with
``cli.py pipeline``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = [("stage", "stage"), ("wall s", "seconds"), ("epochs", "epochs"),
           ("train s", "train"), ("val s (fit)", "fit_validation"), ("self-play s", "selfplay"),
           ("final val s", "validate"), ("test s", "test"), ("export s", "export"),
           ("rows/s", "train_rows_per_s"), ("tokens/s", "train_tokens_per_s"),
           ("val users/s", "fit_validation_users_per_s"), ("test users/s", "test_users_per_s"),
           ("valid N@10", "valid_ndcg@10"), ("test R@10", "test_recall@10"),
           ("test N@10", "test_ndcg@10")]


def stage_row(name: str, record: dict) -> dict:
    """One flat row of the table from a stage's ``stage.json``."""
    timing = record.get("timing", {})
    sec = timing.get("seconds", {})
    row = {"stage": name, "seconds": record.get("seconds"), "epochs": timing.get("epochs")}
    for key in ("train", "fit_validation", "selfplay", "validate", "test", "export"):
        row[key] = sec.get(key)
    for key in ("train_rows_per_s", "train_tokens_per_s", "fit_validation_users_per_s",
                "test_users_per_s", "train_rows", "train_tokens"):
        row[key] = timing.get(key)
    for split in ("valid", "test"):
        for metric, value in (record.get(split) or {}).items():
            row[f"{split}_{metric}"] = value
    return row


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:,.1f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for _, k in COLUMNS) + " |")
    total = sum(r["seconds"] or 0 for r in rows)
    lines.append(f"\nstage time in all: {total:,.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ml100k/pipeline.yaml")
    parser.add_argument("--run_dir", default=None,
                        help="run directory (default: a fresh temporary one, removed after)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--profile", default=None, metavar="STAGE",
                        help="run STAGE under cProfile and print its hot spots")
    parser.add_argument("--top", type=int, default=25, help="functions per profile table")
    parser.add_argument("--json", default=None, help="write the rows and conditions here")
    args, passthrough = parser.parse_known_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import cli
    from lightning_modules.components.artifacts import read_json, stage_complete, stage_dir

    tmp = None
    if args.run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_pipeline_")
        run_dir = Path(tmp.name)
    else:
        run_dir = Path(args.run_dir)
    profiles: dict[str, str] = {}
    if args.profile:
        original = cli.run_stage

        def profiled(name, *a, **k):
            if name != args.profile:
                return original(name, *a, **k)
            prof = cProfile.Profile()
            try:
                return prof.runcall(original, name, *a, **k)
            finally:
                for order in ("tottime", "cumulative"):
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order) \
                        .print_stats(args.top)
                    profiles[order] = buf.getvalue()

        cli.run_stage = profiled

    start = time.perf_counter()
    pipe = ["--config", args.config, "--run_dir", str(run_dir)]
    if args.stages:
        pipe += ["--stages", args.stages]
    cli.pipeline(pipe + passthrough)
    wall = time.perf_counter() - start

    import yaml

    spec = yaml.safe_load(Path(args.config).read_text())
    names = [s["name"] for s in spec["stages"]]
    rows = [stage_row(n, read_json(stage_dir(run_dir, n) / "stage.json"))
            for n in names if stage_complete(run_dir, n)]
    commit = cli.git_commit(short=True, mark_dirty=True) or "unknown"
    conditions = {"config": args.config, "commit": commit, "threads": args.threads,
                  "cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "torch": torch.__version__, "flags": passthrough,
                  "process_wall_seconds": round(wall, 1),
                  "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\n## {args.config} — commit {conditions['commit']}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, {conditions['date']}\n")
    print(markdown(rows))
    for order, text in profiles.items():
        print(f"\n### profile of stage {args.profile}, by {order}\n")
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"conditions": conditions, "stages": rows},
                                              indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
