"""Most-popular baseline: every user gets the catalogue ranked by training interactions.

The floor of every table: a recommender that ignores the user. Popularity is counted on the
training split only (no validation or test target counts), ties go to the lower item index,
and the user's own history is excluded like for every other model (the protocol).
"""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import torch

from lightning_modules.components.catalogue_eval import CatalogueScoringEval
from lightning_modules.components.metrics import RankingEvaluator


class MostPopular(CatalogueScoringEval, L.LightningModule):
    """Ranks items by their number of training interactions; nothing to train.

    Args:
        ks: cut-offs for Recall@K / NDCG@K.
        exclude_history: drop already-seen items from the ranking (protocol default).
        run_dir: pipeline run directory (per-user ranks go to ``<run_dir>/popular``).
    """

    reads_stages = ()

    stage_name = "popular"

    def __init__(self, ks: list[int] = [5, 10], exclude_history: bool = True,  # noqa: B006
                 run_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.evaluator = RankingEvaluator(ks, exclude_history)
        self.register_buffer("order_scores", torch.zeros(0), persistent=False)
        self.last_ranks: dict = {}
        self.counts: np.ndarray | None = None
        self.run_dir = run_dir

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "split"):
            raise ValueError("MostPopular needs a RecDataModule (its training split)")
        dm.load()
        counts = dm.split.train_item_counts()
        self.counts = counts
        # Integer scores, exact in float32: the most popular item scores num_items, the next
        # num_items - 1, ... (a stable sort: equal counts keep the lower index first).
        order = np.argsort(-counts, kind="stable")
        scores = np.empty(dm.num_items, dtype=np.float32)
        scores[order] = np.arange(dm.num_items, 0, -1, dtype=np.float32)
        self.order_scores = torch.from_numpy(scores).to(self.device)

    def training_step(self, batch, batch_idx):  # counted in setup; the stage runs 0 epochs
        return None

    def configure_optimizers(self):
        # Nothing to optimise; Lightning's warning about it is expected here, not a problem.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers. returned .None.")
        return None

    def score_batch(self, batch: dict) -> torch.Tensor:
        return self.order_scores.unsqueeze(0).expand(len(batch["targets"]), -1)

    def export_artifacts(self) -> dict:
        if self.counts is None:
            return {}
        top = np.argsort(-self.counts, kind="stable")[:10]
        dm = self.trainer.datamodule
        return {"dataset": dm.dataset.name, "num_items": int(dm.num_items),
                "train_interactions": int(self.counts.sum()),
                "top_items": [str(dm.dataset.item_ids[i]) for i in top]}
