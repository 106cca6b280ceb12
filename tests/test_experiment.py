"""Experiment statistics against hand-computed values, and a 2-row x 2-seed slice experiment
through the real CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_modules.components.statistics import (
    paired_bootstrap,
    per_user_metrics,
    t_interval,
)

ROOT = Path(__file__).resolve().parents[1]


def test_t_interval_by_hand():
    out = t_interval([0.1, 0.2, 0.3])
    assert out["mean"] == pytest.approx(0.2) and out["std"] == pytest.approx(0.1)
    # t_{0.975, 2} = 4.302653; half-width = t * s / sqrt(n)
    assert out["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert out["low"] == pytest.approx(0.2 - out["half_width"])
    single = t_interval([0.5])
    assert single["mean"] == 0.5 and single["half_width"] is None


def test_per_user_metrics_from_ranks():
    m = per_user_metrics([0, 3, 9, 1 << 30], ks=(5, 10))
    assert m["recall@5"].tolist() == [1, 1, 0, 0] and m["recall@10"].tolist() == [1, 1, 1, 0]
    assert m["ndcg@10"].tolist() == pytest.approx([1.0, 1 / math.log2(5), 1 / math.log2(11), 0])


def test_paired_bootstrap_by_hand():
    same = paired_bootstrap([0.0, 1.0, 0.5], [0.0, 1.0, 0.5], resamples=200)
    assert same["mean_diff"] == 0 and same["low"] == same["high"] == 0
    assert same["p_value"] == 1.0 and not same["excludes_zero"]
    shifted = paired_bootstrap([0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4], resamples=200)
    assert shifted["mean_diff"] == pytest.approx(0.2)
    assert shifted["low"] == pytest.approx(0.2) and shifted["high"] == pytest.approx(0.2)
    assert shifted["p_value"] == pytest.approx(2 / 201) and shifted["excludes_zero"]
    # The resampling itself, recomputed by hand from the same seeded index draws.
    a, b = np.array([1.0, 0, 0, 1, 1, 0]), np.array([0.0, 0, 1, 0, 1, 0])
    got = paired_bootstrap(a, b, resamples=500, seed=3)
    idx = np.random.default_rng(3).integers(0, 6, size=(500, 6))
    boot = (a - b)[idx].mean(axis=1)
    assert got["low"] == pytest.approx(np.quantile(boot, 0.025))
    assert got["high"] == pytest.approx(np.quantile(boot, 0.975))
    below, above = (np.sum(boot <= 0) + 1) / 501, (np.sum(boot >= 0) + 1) / 501
    assert got["p_value"] == pytest.approx(min(1.0, 2 * min(below, above)))
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_slice_experiment_two_rows_two_seeds(tmp_path):
    out = tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The shipped YAML as a ladder (steps: every row also against the row above it).
    spec = tmp_path / "sasrec_width_steps.yaml"
    spec.write_text((ROOT / "configs/experiments/sasrec_width.yaml").read_text()
                    + "steps: true\n")
    args = [sys.executable, "cli.py", "experiment", "--config",
            str(spec), "--out", str(out), "--seeds", "2",
            "--data.init_args.max_users=60", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["reference"] == "sasrec_64" and res["commit"]
    assert res["protocol"]["ks"] == [5, 10] and not res["incomplete"]
    for row in ("sasrec_64", "sasrec_32"):
        stat = res["rows"][row]["test"]["ndcg@10"]
        assert len(stat["values"]) == 2 and stat["half_width"] is not None
        per_seed = [json.loads((out / "runs" / row / f"seed{s}" / "sasrec" / "stage.json")
                               .read_text())["test"]["ndcg@10"] for s in (0, 1)]
        assert stat["values"] == pytest.approx(per_seed)
    comp = res["paired_vs_reference"]["sasrec_32"]
    assert comp["ndcg@10"]["users"] == 2 * 60 and comp["seeds"] == [0, 1]
    means = [res["rows"][r]["test"]["ndcg@10"]["mean"] for r in ("sasrec_32", "sasrec_64")]
    assert comp["ndcg@10"]["mean_diff"] == pytest.approx(means[0] - means[1], abs=1e-6)
    # Over seeds: the per-seed differences of the row means, with a t-interval over the seeds.
    seeds = comp["over_seeds"]["ndcg@10"]
    per_seed_diff = [a - b for a, b in zip(res["rows"]["sasrec_32"]["test"]["ndcg@10"]["values"],
                                           res["rows"]["sasrec_64"]["test"]["ndcg@10"]["values"])]
    assert seeds["values"] == pytest.approx(per_seed_diff, abs=1e-6) and seeds["n"] == 2
    assert seeds["low"] <= seeds["mean"] <= seeds["high"]
    assert "## test: difference against sasrec_64 over seeds" in (out / "results.md").read_text()
    # The same pairing on validation users, for choosing between rows without the test.
    valid = res["paired_vs_reference_valid"]["sasrec_32"]
    assert valid["ndcg@10"]["users"] == 2 * 60 and valid["seeds"] == [0, 1]
    vmeans = [res["rows"][r]["valid"]["ndcg@10"]["mean"] for r in ("sasrec_32", "sasrec_64")]
    assert valid["ndcg@10"]["mean_diff"] == pytest.approx(vmeans[0] - vmeans[1], abs=1e-6)
    assert valid["ndcg@10"]["mean_diff"] != comp["ndcg@10"]["mean_diff"]
    assert "## valid: difference against sasrec_64" in (out / "results.md").read_text()
    # The ladder's steps on both splits (the row above sasrec_32 is the reference here).
    for key, ref in (("paired_vs_previous", comp), ("paired_vs_previous_valid", valid)):
        step = res[key]["sasrec_32"]
        assert step["against"] == "sasrec_64"
        assert step["ndcg@10"]["mean_diff"] == pytest.approx(ref["ndcg@10"]["mean_diff"])
    assert "## valid: difference against the row above" in (out / "results.md").read_text()
    assert "| sasrec_32 | sasrec (slice: first 60 users) |" in (out / "results.md").read_text()
    assert res["rows"]["sasrec_32"]["evaluated_users"]["slice"] == 60
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The seeds differ: the two seeds' runs are not copies of each other.
    a, b = (np.load(out / "runs" / "sasrec_64" / f"seed{s}" / "sasrec" / "ranks_test.npy")
            for s in (0, 1))
    assert not np.array_equal(a, b)
    # Resume: a second call recomputes nothing (every stage is complete) and gives the same.
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "skipped" in again.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["rows"] == res["rows"]
    # Wall time adds up over the invocations; each stage records the commit that made it.
    calls = json.loads((out / "invocations.json").read_text())
    assert len(calls) == 2 and res2["wall_seconds"] == pytest.approx(
        sum(c["seconds"] for c in calls), abs=0.11)
    commits = res2["rows"]["sasrec_64"]["commits"]
    assert len(commits) == 1 and commits[0] != "None"
    assert f"stages made with commit {commits[0]}" in (out / "results.md").read_text()


def test_experiment_reuses_stages_shared_by_rows(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: shared stages\nseeds: 1\nrows:\n"
                    "  - {name: a, pipeline: configs/ml100k/pipeline.yaml, stages: [sasrec]}\n"
                    "  - {name: b, pipeline: configs/ml100k/pipeline.yaml, stages: [sasrec]}\n")
    out = tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "cli.py", "experiment", "--config", str(spec),
                           "--out", str(out), "--data.init_args.max_users=40",
                           "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
                           "--trainer.accelerator=cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("stage sasrec: running") == 1
    a, b = (json.loads((out / "runs" / r / "seed0" / "sasrec" / "stage.json").read_text())
            for r in ("a", "b"))
    assert b["reused_from"] == str(out / "runs" / "a" / "seed0" / "sasrec")
    assert b["test"] == a["test"] and b["stage_fingerprint"] == a["stage_fingerprint"]
    res = json.loads((out / "results.json").read_text())
    assert res["paired_vs_reference"]["b"]["ndcg@10"]["mean_diff"] == 0.0
    # --report_only runs nothing and reports what is there.
    again = subprocess.run([sys.executable, "cli.py", "experiment", "--config", str(spec),
                            "--out", str(out), "--report_only"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "stage sasrec" not in again.stderr
    reported = json.loads((out / "results.json").read_text())
    assert reported["rows"] == res["rows"] and reported["commit"] is None
    assert reported["wall_seconds"] == res["wall_seconds"]  # a report adds no wall time


def test_experiment_seed_list_runs_exactly_those_seeds(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: seed list\nseeds: 3\nrows:\n"
                    "  - {name: a, pipeline: configs/ml100k/pipeline.yaml, stages: [sasrec]}\n")
    out = tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "cli.py", "experiment", "--config", str(spec), "--out", str(out)]
    bad = subprocess.run([*base, "--seed_list", "2,x"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--seed_list '2,x': expected comma-separated" in bad.stderr
    both = subprocess.run([*base, "--seed_list", "2", "--seeds", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "give one of them" in both.stderr
    proc = subprocess.run([*base, "--seed_list", "4,2", "--data.init_args.max_users=40",
                           "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
                           "--trainer.accelerator=cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "runs" / "a").iterdir()) == ["seed2", "seed4"]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [2, 4] and res["rows"]["a"]["seeds"] == [2, 4]
    # Seed 4's run is seed 4's: its own fingerprint, and not seed 2's numbers.
    two, four = (json.loads((out / "runs" / "a" / f"seed{k}" / "sasrec" / "stage.json")
                            .read_text()) for k in (2, 4))
    assert two["stage_fingerprint"] != four["stage_fingerprint"] and two["test"] != four["test"]


def test_experiment_workers_compute_shared_stages_once(tmp_path):
    """Two worker processes, 2 rows x 2 seeds of the same stage: each seed's stage is computed
    once (the other worker waits on its lock, then copies it), every run is complete, and the
    results equal those of one process computing the same runs one after the other."""
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: workers\nseeds: 2\nrows:\n"
                    "  - {name: a, pipeline: configs/ml100k/pipeline.yaml, stages: [sasrec]}\n"
                    "  - {name: b, pipeline: configs/ml100k/pipeline.yaml, stages: [sasrec]}\n")
    flags = ["--data.init_args.max_users=40", "--trainer.max_epochs=1",
             "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                            "ALIGN3GR_THREADS")}
    out = tmp_path / "parallel"
    proc = subprocess.run([sys.executable, "cli.py", "experiment", "--config", str(spec),
                           "--out", str(out), "--workers", "2", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 runs on 2 workers" in proc.stderr and "[4/4]" in proc.stderr
    logs = sorted((out / "logs").glob("*.log"))
    assert [p.name for p in logs] == ["a_seed0.log", "a_seed1.log", "b_seed0.log",
                                      "b_seed1.log"]
    assert sum(p.read_text().count("stage sasrec: running") for p in logs) == 2
    for seed in (0, 1):
        a, b = (json.loads((out / "runs" / r / f"seed{seed}" / "sasrec" / "stage.json")
                           .read_text()) for r in ("a", "b"))
        assert a["stage_fingerprint"] == b["stage_fingerprint"]
        assert ("reused_from" in a) != ("reused_from" in b)  # one computed, one copied
    res = json.loads((out / "results.json").read_text())
    assert not res["incomplete"]
    sequential = tmp_path / "sequential"
    proc = subprocess.run([sys.executable, "cli.py", "experiment", "--config", str(spec),
                           "--out", str(sequential), "--rows", "a", *flags],
                          cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    seq = json.loads((sequential / "results.json").read_text())
    assert seq["rows"]["a"]["test"] == res["rows"]["a"]["test"]


def test_experiment_workers_report_a_failed_run(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: failing\nseeds: 1\nrows:\n"
                    "  - {name: a, pipeline: configs/ml100k/pipeline.yaml, stages: [sft]}\n")
    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "cli.py", "experiment", "--config", str(spec),
                           "--out", str(out), "--workers", "2",
                           "--data.init_args.max_users=40"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    # The sft stage needs the tokenizer's SCIDs, which this run does not have.
    assert proc.returncode == 1
    assert "row a, seed 0: exit 2, see" in proc.stderr and "FAILED" in proc.stderr
    log = (out / "logs" / "a_seed0.log").read_text()
    assert "no SCID map here; run the 'tokenizer' stage first" in log
    assert json.loads((out / "results.json").read_text())["incomplete"]
