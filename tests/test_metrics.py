"""Recall@K / NDCG@K against hand-computed values."""

import math

import pytest
import torch

from lightning_modules.components.metrics import (
    NOT_RANKED,
    RankingEvaluator,
    TopKMetrics,
    ranks_from_lists,
    ranks_from_scores,
)


def test_ranks_from_scores_counts_strictly_better_items():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    target = torch.tensor([2, 3])
    assert ranks_from_scores(scores, target).tolist() == [1, 3]


def test_history_exclusion_removes_seen_items_but_never_the_target():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    target = torch.tensor([2, 3])
    seen = torch.tensor([[1, -1], [0, 3]])  # row 1 lists its own target: must stay rankable
    assert ranks_from_scores(scores, target, seen).tolist() == [0, 2]


def test_ranks_from_lists_and_missing_target():
    ranked = torch.tensor([[4, 2, 7, -1], [1, 3, 5, 6]])
    assert ranks_from_lists(ranked, torch.tensor([7, 9])).tolist() == [2, NOT_RANKED]


def test_topk_metrics_hand_computed():
    metric = TopKMetrics([1, 3])
    metric.update(torch.tensor([0, 2, 5, NOT_RANKED]))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["recall@1"] == pytest.approx(1 / 4)
    assert out["recall@3"] == pytest.approx(2 / 4)
    assert out["ndcg@1"] == pytest.approx(1 / 4)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert list(out) == ["recall@1", "recall@3", "ndcg@1", "ndcg@3"]


def test_metrics_accumulate_over_batches_and_reset():
    ev = RankingEvaluator([5, 10])
    ev.update_ranked("valid", torch.tensor([[3, 1]]), torch.tensor([1]))
    ev.update_ranked("valid", torch.tensor([[3, 1]]), torch.tensor([8]))
    out = ev.compute("valid")
    assert out["recall@5"] == pytest.approx(0.5)
    assert out["ndcg@10"] == pytest.approx(0.5 / math.log2(3))
    ev.reset("valid")
    ev.update_ranked("valid", torch.tensor([[3, 1]]), torch.tensor([3]))
    assert ev.compute("valid")["ndcg@5"] == pytest.approx(1.0)


def test_invalid_ks_rejected():
    with pytest.raises(ValueError, match="positive"):
        TopKMetrics([0, 5])


def test_per_user_ranks_are_kept_by_row_and_cleared_by_reset():
    import torch as _torch

    from lightning_modules.components.metrics import NOT_RANKED, RankingEvaluator

    ev = RankingEvaluator(ks=[1, 2])
    ev.update_ranked("test", _torch.tensor([[3, 1, 2], [0, 5, 6]]), _torch.tensor([1, 9]),
                     rows=_torch.tensor([4, 2]))
    ev.update_scores("test", _torch.tensor([[0.1, 0.9, 0.5]]), _torch.tensor([2]),
                     rows=_torch.tensor([0]))
    rows, ranks = ev.per_user("test")
    assert rows.tolist() == [0, 2, 4] and ranks.tolist() == [1, NOT_RANKED, 1]
    assert ev.compute("test")["recall@2"] == pytest.approx(2 / 3)
    ev.reset("test")
    assert ev.per_user("test") is None
    ev.update_ranked("valid", _torch.tensor([[1]]), _torch.tensor([1]))   # no rows: none kept
    assert ev.per_user("valid") is None
