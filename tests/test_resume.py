"""Kills at five points of a slice pipeline, each followed by the same command: the run ends
with the metrics and per-user ranks of an uninterrupted run, and no stale checkpoint. The same
slice run's sft and dpo models evaluate to the same metrics on 2 DDP processes as on one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def _assert_resumed(stderr: str, stage: str | None) -> None:
    """The run after a kill at ``last.ckpt`` continued after the stage's first epoch (the
    kill came between epochs: each stage trains 2 here), not from its start or its end."""
    if stage is not None:
        pattern = rf"stage {stage}: resuming the interrupted run from \S+ \(epoch 0\)"
        assert re.search(pattern, stderr), stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = run(["cli.py", *pipeline_args(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_killed_pipeline_resumes_to_the_uninterrupted_result(reference, tmp_path):
    killed = tmp_path / "killed"
    points = [("last_ckpt", "sasrec"), ("stage_json", "tokenizer"), ("last_ckpt", "sft"),
              ("stage_json", "sft"), ("last_ckpt", "dpo")]
    resumes = None  # the stage the next command must continue inside its fit
    for point, stage in points:
        proc = run(["tests/kill_worker.py", point, stage, "--", *pipeline_args(killed)])
        assert proc.returncode == -signal.SIGKILL, (point, stage, proc.stderr[-3000:])
        assert not (killed / stage / "stage.json").exists()
        _assert_resumed(proc.stderr, resumes)
        resumes = stage if point == "last_ckpt" else None
    proc = run(["cli.py", *pipeline_args(killed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_resumed(proc.stderr, resumes)
    assert results(killed) == results(reference)
    # A resumed stage reports the whole computation: the epochs and rows of every attempt
    # (up to the checkpoint it continued from) and the seconds they took.
    for stage in ("sasrec", "dpo"):  # killed at last.ckpt, resumed (sft restarted later)
        mine = json.loads((killed / stage / "stage.json").read_text())
        ref = json.loads((reference / stage / "stage.json").read_text())
        for key in ("epochs", "train_rows"):
            assert mine["timing"][key] == ref["timing"][key], (stage, key)
        assert 0 < mine["seconds_before_resume"] < mine["seconds"], stage
        assert "seconds_before_resume" not in ref
    # Nothing stale: no resume state, no second best checkpoint, every stage complete.
    for stage in STAGES:
        folder = killed / stage
        assert not (folder / ".resume.json").exists()
        names = {p.name for p in (folder / "checkpoints").glob("*")}
        assert not any(n.startswith("last") or "-v" in n for n in names), names


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_ddp_evaluation_of_the_llm_stages_matches_one_process(reference, stage, tmp_path):
    ckpt = reference / stage / "checkpoints" / "best.ckpt"
    out = tmp_path / "two.json"
    proc = run(["tests/ddp_eval.py", str(out), "--config", f"configs/ml100k/{stage}.yaml",
                "--ckpt_path", str(ckpt), f"--model.init_args.run_dir={reference}",
                f"--data.init_args.run_dir={reference}", "--trainer.logger=false",
                "--trainer.devices=2", "--trainer.strategy=ddp", *SLICE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = json.loads((reference / stage / "stage.json").read_text())["test"]
    assert two["world_size"] == 2
    for key, value in one.items():
        assert two["metrics"][f"test/{key}"] == pytest.approx(value, abs=1e-6), key
