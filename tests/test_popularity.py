"""The most-popular baseline through the pipeline, checked against ranks computed by hand."""

from __future__ import annotations

import json

import numpy as np

from datamodules.sequential_data import SequentialDataModule


def test_most_popular_ranks_match_training_counts(tmp_path):
    from cli import main

    run = tmp_path / "run"
    assert main(["pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir", str(run),
                 "--stages", "popular", "--data.init_args.max_users=100",
                 "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]) == 0
    record = json.loads((run / "popular" / "stage.json").read_text())
    dm = SequentialDataModule(dataset="ml-100k", max_users=100)
    dm.load()
    split = dm.split
    counts = np.bincount(np.concatenate(split.train_items), minlength=dm.num_items)
    # Training counts only: the held-out targets add nothing.
    assert record["train_interactions"] == int(counts.sum())
    assert record["top_items"][0] == dm.dataset.item_ids[int(np.argmax(counts))]
    order = np.argsort(-counts, kind="stable")
    position = np.empty(dm.num_items, dtype=np.int64)
    position[order] = np.arange(dm.num_items)
    ranks = np.load(run / "popular" / "ranks_test.npy")
    targets = split.target("test")
    assert len(ranks) == len(targets) == 100
    for row, (target, rank) in enumerate(zip(targets, ranks)):
        seen = set(split.seen_items(row, "test").tolist()) - {int(target)}
        above = [i for i in order[:position[target]] if int(i) not in seen]
        assert rank == len(above)
    hits = (ranks < 10).mean()
    assert abs(record["test"]["recall@10"] - hits) < 1e-6
