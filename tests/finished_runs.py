"""A finished ML-100K slice run (sasrec, tokenizer, sft) and the scripts that read it again
(``bench/eval_user_refresh.py``, ``bench/eval_decode_prior.py``), run as the user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--data.init_args.max_users=60", "--trainer.enable_progress_bar=false"]


def run_python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository root at one thread; asserts success unless told."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def finished_run(runs: Path, flags: list[str]) -> tuple[Path, dict]:
    """``runs/seed0`` with finished sasrec, tokenizer and sft stages of seed 0, and the
    modification times of its files (to check that a reader left them alone)."""
    source = runs / "seed0"
    run_python("cli.py", "pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir",
               str(source), "--stages", "sasrec,tokenizer,sft", "--seed_everything=0",
               "--data.init_args.seed=0", *flags)
    return source, files_of(source)


def files_of(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
