"""Validation and test hooks shared by the models that score the whole catalogue at once."""

from __future__ import annotations


class CatalogueScoringEval:
    """Mixin for a LightningModule with ``score_batch(batch) -> [B, num_items]``: ranks every
    item for each evaluation row (the batch's ``targets``, ``seen`` and ``rows``), logs
    ``val/*`` and ``test/*`` metrics, and keeps per-user ranks in ``last_ranks`` for export.
    Needs ``self.evaluator`` (a ``RankingEvaluator``) and ``self.last_ranks`` (a dict)."""

    def score_batch(self, batch: dict):
        raise NotImplementedError

    def _eval_step(self, split: str, batch: dict) -> None:
        self.evaluator.update_scores(split, self.score_batch(batch), batch["targets"],
                                     batch["seen"], rows=batch["rows"])

    def _eval_end(self, split: str, prefix: str) -> None:
        metrics = self.evaluator.compute(split)
        self.last_ranks[split] = self.evaluator.per_user(split)  # per-user ranks for export
        self.evaluator.reset(split)
        for k, v in metrics.items():
            self.log(f"{prefix}/{k}", v, prog_bar=k == "ndcg@10", sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("valid", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("valid", "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", "test")
