"""`cli.py breakdown`: per group of users (target popularity, history length), each stage's
mean metric and its paired difference, from the ranks that real stages wrote."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lightning_modules.components.breakdown import (
    breakdown_table,
    quantile_groups,
    render_breakdown,
)

SLICE = ["--data.init_args.max_users=100", "--trainer.max_epochs=1",
         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def test_quantile_groups_split_users_evenly_and_never_split_a_value():
    assert quantile_groups([0, 0, 0, 1, 2, 3, 4, 5, 6, 7], 2) == [(0, 2), (3, 7)]
    assert quantile_groups(list(range(100)), 4) == [(0, 24), (25, 49), (50, 74), (75, 99)]
    # Equal values stay together: fewer groups than asked.
    assert quantile_groups([3] * 9 + [8], 5) == [(3, 8)]
    assert quantile_groups([3] * 5 + [8] * 5, 5) == [(3, 7), (8, 8)]
    assert quantile_groups([5, 5, 5], 3) == [(5, 5)]
    with pytest.raises(ValueError, match="at least one"):
        quantile_groups([], 3)


def test_breakdown_table_means_and_paired_differences():
    keys = np.array([1, 1, 2, 2, 9, 9])
    a = np.array([0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    b = np.array([0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    table = breakdown_table(keys, {"a": a, "b": b}, "a", [(1, 1), (2, 5), (6, 8), (9, 9)],
                            resamples=200)
    groups = {r["group"]: r for r in table}
    assert [r["group"] for r in table] == ["1", "2-5", "6-8", "9", "all"]
    assert groups["1"]["means"] == {"a": 0.0, "b": 0.5}
    assert groups["2-5"]["diff"]["b"]["mean_diff"] == 0.0
    assert not groups["2-5"]["diff"]["b"]["excludes_zero"]
    assert groups["9"]["diff"]["b"]["mean_diff"] == -1.0 and groups["9"]["diff"]["b"][
        "excludes_zero"]
    assert groups["6-8"]["users"] == 0 and groups["6-8"]["means"] == {}
    assert groups["all"]["users"] == 6 and groups["all"]["means"]["b"] == pytest.approx(2 / 6)
    text = render_breakdown(table, "a", "key", "ndcg@10")
    assert "| 9 | 2 (33%) | 1.0000 | 0.0000 | **-1.0000 [-1.0000, -1.0000]** | 0.00 |" in text
    assert "| 6-8 | 0 |" in text
    with pytest.raises(ValueError, match="reference stage 'c'"):
        breakdown_table(keys, {"a": a}, "c", [(1, 9)])
    with pytest.raises(ValueError, match="stage 'b'"):
        breakdown_table(keys, {"a": a, "b": b[:3]}, "a", [(1, 9)])


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    from cli import main

    run = tmp_path_factory.mktemp("breakdown") / "run"
    assert main(["pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir", str(run),
                 "--stages", "popular,sasrec", *SLICE]) == 0
    return run


def test_breakdown_by_popularity_matches_the_stages_metrics(two_stage_run, tmp_path, capsys):
    from cli import main
    from datamodules.sequential_data import SequentialDataModule

    out = tmp_path / "table.json"
    assert main(["breakdown", "--runs", str(two_stage_run), "--stages", "popular,sasrec",
                 "--groups", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test ndcg@10 by target's training interactions: 1 run(s), 100 user rows" in printed
    table = json.loads(out.read_text())["table"]
    assert [r["group"] for r in table][-1] == "all" and len(table) <= 5
    assert sum(r["users"] for r in table[:-1]) == table[-1]["users"] == 100
    metrics = json.loads((two_stage_run / "metrics.json").read_text())["stages"]
    for stage in ("popular", "sasrec"):
        assert table[-1]["means"][stage] == pytest.approx(metrics[stage]["test"]["ndcg@10"],
                                                          abs=1e-6)
        weighted = sum(r["share"] * r["means"][stage] for r in table[:-1] if r["users"])
        assert weighted == pytest.approx(table[-1]["means"][stage], abs=1e-9)
    diff = table[-1]["diff"]["sasrec"]
    assert diff["mean_diff"] == pytest.approx(
        metrics["sasrec"]["test"]["ndcg@10"] - metrics["popular"]["test"]["ndcg@10"], abs=1e-6)
    # The groups are ranges of the target's count in the training sequences, computed here by
    # hand: most-popular can only hit targets that are popular, so its top group beats its
    # bottom one.
    dm = SequentialDataModule(dataset="ml-100k", max_users=100)
    dm.load()
    counts = np.bincount(np.concatenate(dm.split.train_items), minlength=dm.num_items)
    keys = counts[dm.split.test_target]
    for r in table[:-1]:
        assert r["users"] == int(((keys >= r["low"]) & (keys <= r["high"])).sum())
    assert table[-2]["means"]["popular"] > table[0]["means"]["popular"]
    # By history length, on the validation split, with recall.
    assert main(["breakdown", "--runs", str(two_stage_run), str(two_stage_run), "--stages",
                 "sasrec,popular", "--by", "history", "--split", "valid",
                 "--metric", "recall@10", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["table"]
    assert table[-1]["users"] == 200  # two runs: the rows are pooled
    assert table[-1]["means"]["sasrec"] == pytest.approx(
        metrics["sasrec"]["valid"]["recall@10"], abs=1e-6)
    lengths = np.array([len(s) for s in dm.split.train_items])
    assert table[0]["low"] == lengths.min() and table[-2]["high"] == lengths.max()


def test_breakdown_refuses_what_it_cannot_compare(two_stage_run, tmp_path, capsys):
    from cli import main

    with pytest.raises(FileNotFoundError, match="no completed stage 'dpo'"):
        main(["breakdown", "--runs", str(two_stage_run), "--stages", "popular,dpo"])
    for flags, message in (
            (["--metric", "auc"], "expected recall@K or ndcg@K"),
            (["--reference", "dpo"], "--reference 'dpo' is not in --stages"),
            (["--groups", "0"], "must be positive")):
        with pytest.raises(SystemExit):
            main(["breakdown", "--runs", str(two_stage_run), "--stages", "popular,sasrec",
                  *flags])
        assert message in capsys.readouterr().err
    # A run made from other data than the pipeline YAML's is refused, not mis-joined.
    other = tmp_path / "other"
    shutil.copytree(two_stage_run, other)
    marker = other / "sasrec" / "stage.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "data_digest": "0123456789abcdef"}))
    with pytest.raises(SystemExit):
        main(["breakdown", "--runs", str(other), "--stages", "popular,sasrec"])
    assert "was made from other data (digest 0123456789abcdef)" in capsys.readouterr().err


def test_breakdown_compares_rows_of_an_experiment_seed_by_seed(two_stage_run, tmp_path,
                                                               capsys):
    from cli import main

    out = tmp_path / "exp"
    for row, seed in (("a", 0), ("b", 0), ("a", 1)):  # seed 1 only in row a: not paired
        shutil.copytree(two_stage_run, out / "runs" / row / f"seed{seed}")
    table_path = tmp_path / "rows.json"
    assert main(["breakdown", "--experiment", str(out), "--stages", "a:popular,b:sasrec",
                 "--groups", "3", "--out", str(table_path)]) == 0
    assert "1 run(s), 100 user rows, difference against a:popular" in capsys.readouterr().out
    result = json.loads(table_path.read_text())
    assert result["runs"] == ["seed 0"]
    assert result["columns"]["b:sasrec"] == [str(out / "runs" / "b" / "seed0" / "sasrec")]
    metrics = json.loads((two_stage_run / "metrics.json").read_text())["stages"]
    assert result["table"][-1]["diff"]["b:sasrec"]["mean_diff"] == pytest.approx(
        metrics["sasrec"]["test"]["ndcg@10"] - metrics["popular"]["test"]["ndcg@10"], abs=1e-6)
    for stages, message in (("a:popular,sasrec", "each column is ROW:STAGE"),
                            ("a:popular,c:sasrec", "no completed stage 'sasrec' of row 'c'"),
                            ("a:popular,a:popular", "a column is named twice")):
        with pytest.raises(SystemExit):
            main(["breakdown", "--experiment", str(out), "--stages", stages])
        assert message in capsys.readouterr().err
