"""Recall@K and NDCG@K over the full catalogue: the one evaluator every stage uses.

With one target per user, Recall@K = HitRate@K = 1[rank < K] and NDCG@K = 1/log2(rank + 2)
if rank < K else 0, where ``rank`` is the 0-based position of the target in the ranking.
States are sums, so torchmetrics reduces them exactly under DDP (no padded duplicates as long
as each user is evaluated once; the DataModules use an unrepeated sampler for evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

NOT_RANKED = 1 << 30  # rank given to a target the ranking never reached


def ranks_from_scores(scores: torch.Tensor, target: torch.Tensor,
                      exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of ``target`` under ``scores``.

    Args:
        scores: ``[B, num_items]`` higher is better.
        target: ``[B]`` item indices.
        exclude: optional ``[B, H]`` item indices to drop from the candidates (history);
            negative entries are padding. The target itself is never excluded.
    Returns:
        ``[B]`` long tensor: number of candidates scored strictly above the target.
    """
    scores = scores.float().clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target]
    if exclude is not None and exclude.numel():
        valid = exclude >= 0
        r = rows.unsqueeze(1).expand_as(exclude)[valid]
        scores[r, exclude[valid]] = float("-inf")
        scores[rows, target] = target_score
    return (scores > target_score.unsqueeze(1)).sum(dim=1)


def ranks_from_lists(ranked_items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``target`` in ``ranked_items`` (``[B, N]``, best first, -1 = empty).

    A target that is not in the list gets :data:`NOT_RANKED` (ranked below everything).
    """
    hit = ranked_items == target.unsqueeze(1)
    pos = torch.where(hit.any(dim=1), hit.float().argmax(dim=1),
                      torch.full_like(target, NOT_RANKED))
    return pos.long()


class TopKMetrics(Metric):
    """Recall@K and NDCG@K from target ranks; ``compute()`` returns ``{"recall@5": ...}``.

    With ``rows`` given to :meth:`update`, the per-user ranks are kept too (concatenated across
    processes under DDP) and :meth:`per_user` returns them ordered by row.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) <= 0 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.ks = sorted(int(k) for k in ks)
        for k in self.ks:
            self.add_state(f"hits_{k}", torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"ndcg_{k}", torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("ranks", default=[], dist_reduce_fx="cat")

    def update(self, ranks: torch.Tensor,  # type: ignore[override]
               rows: torch.Tensor | None = None) -> None:
        if rows is not None:
            self.rows.append(torch.as_tensor(rows, device=ranks.device).long().reshape(-1))
            self.ranks.append(ranks.long().reshape(-1))
        ranks = ranks.to(torch.float64)
        gain = 1.0 / torch.log2(ranks.clamp(max=1e9) + 2.0)
        for k in self.ks:
            inside = ranks < k
            setattr(self, f"hits_{k}", getattr(self, f"hits_{k}") + inside.sum())
            setattr(self, f"ndcg_{k}", getattr(self, f"ndcg_{k}") + (gain * inside).sum())
        self.count = self.count + ranks.numel()

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        n = self.count.clamp(min=1.0)
        out = {}
        for k in self.ks:
            out[f"recall@{k}"] = (getattr(self, f"hits_{k}") / n).float()
        for k in self.ks:
            out[f"ndcg@{k}"] = (getattr(self, f"ndcg_{k}") / n).float()
        return out

    def per_user(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, ranks)`` (both ``LongTensor [N]``, CPU, sorted by row) of every update that
        gave rows since the last reset, gathered across processes; ``None`` if none did.
        Rank = candidates ranked above the target; :data:`NOT_RANKED` = never reached."""
        with self.sync_context(should_sync=self._to_sync):   # no-op outside DDP
            rows, ranks = self.rows, self.ranks
            if isinstance(rows, list):
                if not rows:
                    return None
                rows, ranks = torch.cat(rows), torch.cat(ranks)
            order = torch.argsort(rows)
            return rows[order].cpu().clone(), ranks[order].cpu().clone()


class RankingEvaluator(torch.nn.Module):
    """The shared evaluator: one :class:`TopKMetrics` per evaluation split.

    Scoring models call :meth:`update_scores`; generative models call :meth:`update_ranked`
    with their (history-excluded) beam outputs.
    """

    def __init__(self, ks: Sequence[int] = (5, 10), exclude_history: bool = True) -> None:
        super().__init__()
        self.ks = list(ks)
        self.exclude_history = exclude_history
        self.metrics = torch.nn.ModuleDict({s: TopKMetrics(ks) for s in ("valid", "test")})

    def update_scores(self, split: str, scores: torch.Tensor, target: torch.Tensor,
                      history: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None) -> None:
        exclude = history if self.exclude_history else None
        self.metrics[split].update(ranks_from_scores(scores, target, exclude), rows)

    def update_ranked(self, split: str, ranked_items: torch.Tensor,
                      target: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.metrics[split].update(ranks_from_lists(ranked_items, target), rows)

    def compute(self, split: str) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics[split].compute().items()}

    def per_user(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-user ``(rows, ranks)`` of the split's updates since the last reset."""
        return self.metrics[split].per_user()

    def reset(self, split: str) -> None:
        self.metrics[split].reset()
