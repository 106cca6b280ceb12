"""Kills at five points of a slice pipeline, each followed by the same command: the run ends
with the metrics and per-user ranks of an uninterrupted run, and no stale checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLICE = ["--data.init_args.max_users=40", "--trainer.max_epochs=2",
         "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
         "--trainer.accelerator=cpu"]
STAGES = ("sasrec", "tokenizer", "sft", "dpo")


def pipeline_args(run_dir: Path) -> list[str]:
    return ["pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir", str(run_dir),
            "--stages", ",".join(STAGES), *SLICE]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def results(run_dir: Path) -> dict:
    out = {}
    for stage in STAGES:
        record = json.loads((run_dir / stage / "stage.json").read_text())
        out[stage] = {k: record.get(k) for k in ("valid", "test", "stage_fingerprint")}
        for split in ("valid", "test"):
            path = run_dir / stage / f"ranks_{split}.npy"
            if path.exists():
                out[stage][f"ranks_{split}"] = np.load(path).tolist()
    return out


def test_killed_pipeline_resumes_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    proc = run(["cli.py", *pipeline_args(reference)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    points = [("last_ckpt", "sasrec"), ("stage_json", "tokenizer"), ("last_ckpt", "sft"),
              ("stage_json", "sft"), ("last_ckpt", "dpo")]
    for point, stage in points:
        proc = run(["tests/kill_worker.py", point, stage, "--", *pipeline_args(killed)])
        assert proc.returncode == -signal.SIGKILL, (point, stage, proc.stderr[-3000:])
        assert not (killed / stage / "stage.json").exists()
    proc = run(["cli.py", *pipeline_args(killed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage dpo: resuming the interrupted run" in proc.stderr
    assert results(killed) == results(reference)
    # Nothing stale: no resume state, no second best checkpoint, every stage complete.
    for stage in STAGES:
        folder = killed / stage
        assert not (folder / ".resume.json").exists()
        names = {p.name for p in (folder / "checkpoints").glob("*")}
        assert "last.ckpt" not in names and not any("-v" in n for n in names), names
