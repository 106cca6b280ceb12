"""SASRec with cross-entropy over the full catalogue: the baseline and the collaborative encoder.

Kang & McAuley (2018) self-attentive sequential recommendation, trained with a softmax over all
items at every position (the strong CE variant). At the end of fit the stage exports item
embeddings and per-user embeddings (the encoding of each user's *training* history only) for
the tokenizer stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.artifacts import (
    USER_EMBEDDING_FILES,
    USER_PREFIX_EMBEDDING_FILE,
    atomic_torch_save,
    atomic_write_json,
)
from lightning_modules.components.catalogue_eval import CatalogueScoringEval
from lightning_modules.components.dropout import replace_dropout
from lightning_modules.components.metrics import RankingEvaluator
from lightning_modules.components.schedules import warmup_cosine

log = logging.getLogger(__name__)


class SASRecEncoder(nn.Module):
    """Causal transformer over item ids (0 = padding). ``forward(ids [B, T]) -> [B, T, d]``."""

    def __init__(self, num_items: int, max_history: int = 20, hidden_size: int = 64,
                 num_layers: int = 2, num_heads: int = 2, dropout: float = 0.2,
                 attn_dropout: float = 0.2) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_history, hidden_size)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, 4 * hidden_size, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        layer.self_attn.dropout = attn_dropout
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(hidden_size)
        replace_dropout(self)  # same p, a cheaper mask (lightning_modules.components.dropout)
        self.register_buffer("causal", torch.triu(torch.full((max_history, max_history),
                                                             float("-inf")), diagonal=1),
                             persistent=False)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        h = self.item_embedding(ids) * (self.item_embedding.embedding_dim ** 0.5)
        h = self.dropout(h + self.position_embedding(pos))
        # Causal + key padding in one boolean mask ([B*heads, T, T], True = blocked). Every
        # position may see itself, so rows of left padding stay finite (never read later).
        blocked = self.causal[:t, :t].isinf().unsqueeze(0) | (ids == 0).unsqueeze(1)
        blocked = blocked & ~torch.eye(t, dtype=torch.bool, device=ids.device)
        heads = self.blocks.layers[0].self_attn.num_heads
        h = self.blocks(h, mask=blocked.repeat_interleave(heads, dim=0))
        return self.final_norm(h)

    def item_weights(self) -> torch.Tensor:
        """``[num_items, d]`` output embeddings (tied with the inputs, padding row dropped)."""
        return self.item_embedding.weight[1:]


class SASRec(CatalogueScoringEval, L.LightningModule):
    """SASRec trained with full-catalogue cross-entropy at every position.

    Args:
        num_items: catalogue size (linked from the DataModule by the CLI).
        max_history: input length (protocol default 20).
        hidden_size, num_layers, num_heads, dropout, attn_dropout: encoder shape.
        lr, weight_decay: AdamW settings.
        lr_schedule: ``constant`` (the lr throughout) or ``cosine`` (linear warm-up over
            ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio * lr`` at
            ``trainer.max_epochs``; fewer epochs reach the same quality).
        ks: cut-offs for Recall@K / NDCG@K.
        exclude_history: drop already-seen items from the ranking (protocol default).
        run_dir: pipeline run directory; embeddings are exported to ``<run_dir>/sasrec``.
    """

    reads_stages = ()

    stage_name = "sasrec"

    # 2: the users' states after the test and predict histories too; 3: and before every
    # training target (USER_PREFIX_EMBEDDING_FILE). Stages made before lack them, so their
    # fingerprints differ and pipelines recompute them.
    artifacts_version = 3

    def __init__(self, num_items: int = 0, max_history: int = 20, hidden_size: int = 64,
                 num_layers: int = 2, num_heads: int = 2, dropout: float = 0.2,
                 attn_dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", warmup_ratio: float = 0.05,
                 min_lr_ratio: float = 0.0,
                 ks: list[int] = [5, 10], exclude_history: bool = True,  # noqa: B006
                 run_dir: str | None = None) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"model.lr_schedule must be 'constant' or 'cosine', got "
                             f"{lr_schedule!r}")
        self.save_hyperparameters()
        self.encoder: SASRecEncoder | None = None
        if num_items > 0:
            self._build(num_items)
        self.evaluator = RankingEvaluator(ks, exclude_history)
        self.last_ranks: dict = {}  # split -> (rows, ranks) of the latest evaluation
        self.run_dir = run_dir

    def _build(self, num_items: int) -> None:
        hp = self.hparams
        hp["num_items"] = num_items  # saved in checkpoints, so load_from_checkpoint rebuilds
        self.encoder = SASRecEncoder(num_items, hp.max_history, hp.hidden_size, hp.num_layers,
                                     hp.num_heads, hp.dropout, hp.attn_dropout)

    def setup(self, stage: str) -> None:
        # The catalogue size is known only once the DataModule has loaded the data.
        dm = self.trainer.datamodule
        if dm is None:
            if self.encoder is None:
                raise ValueError("SASRec needs num_items or a DataModule that provides it")
            return
        if getattr(dm, "max_history", self.hparams.max_history) != self.hparams.max_history:
            raise ValueError(f"model.max_history={self.hparams.max_history} differs from "
                             f"data.max_history={dm.max_history}; set both to the same value")
        if self.encoder is None:
            self._build(dm.num_items)
        elif dm.num_items != self.hparams.num_items:
            raise ValueError(f"model was built for {self.hparams.num_items} items but the data "
                             f"has {dm.num_items}")

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden = self.encoder(batch["input_ids"])
        targets = batch["targets"]
        keep = targets > 0
        logits = hidden[keep] @ self.encoder.item_weights().T
        loss = F.cross_entropy(logits, targets[keep] - 1)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(keep.sum()))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.get("lr_schedule", "constant") == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": opt,
                "lr_scheduler": warmup_cosine(opt, total, hp.warmup_ratio, hp.min_lr_ratio)}

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_users(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` shifted item ids (0 = padding) → ``[B, d]`` state at the last position."""
        return self.encoder(input_ids)[:, -1]

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, num_items]`` scores of every catalogue item."""
        return self.encode_users(input_ids) @ self.encoder.item_weights().T

    def score_batch(self, batch: dict) -> torch.Tensor:
        return self.score(batch["input_ids"])

    # -- artifacts --------------------------------------------------------------------------
    def export_artifacts(self) -> dict:
        """Write item and user embeddings into ``<run_dir>/sasrec`` (call on rank 0)."""
        if self.run_dir is None:
            log.info("sasrec: no run_dir set, embeddings not exported")
            return {}
        return self.write_embeddings(self.trainer.datamodule,
                                     Path(self.run_dir) / self.stage_name)

    @torch.no_grad()
    def write_embeddings(self, dm, out: Path) -> dict:
        """Item embeddings and the users' states (:data:`USER_EMBEDDING_FILES`) of the data of
        ``dm`` (a :class:`~datamodules.sequential_data.SequentialDataModule`) into ``out``."""
        was_training = self.training
        self.eval()
        # The user's state after its training items (what training and validation prompts
        # show), and after the longer histories of the later splits (the tokenizer re-encodes
        # those into refreshed user SCIDs; see SCIDMap.user_refreshed_codes).
        users = {}
        for stage in USER_EMBEDDING_FILES:
            emb = torch.zeros(dm.num_users, self.hparams.hidden_size)
            for batch in dm.user_history_loader(stage):
                ids = batch["input_ids"].to(self.device)
                enc = self.encode_users(ids).float().cpu()
                enc[(ids == 0).all(dim=1).cpu()] = 0.0  # no items: no signal
                emb[batch["users"]] = enc
            users[stage] = emb
        # And the state before every training target (causal user SCIDs for training prompts).
        loader, offsets = dm.user_prefix_loader()
        prefix = torch.zeros(int(offsets[-1]), self.hparams.hidden_size)
        for batch in loader:
            ids = batch["input_ids"].to(self.device)
            prefix[batch["rows"]] = self.encode_users(ids).float().cpu()
        items = self.encoder.item_weights().detach().float().cpu().clone()
        self.train(was_training)
        atomic_torch_save(items, out / "item_embeddings.pt")
        for stage, name in USER_EMBEDDING_FILES.items():
            atomic_torch_save(users[stage], out / name)
        atomic_torch_save({"states": prefix, "offsets": offsets},
                          out / USER_PREFIX_EMBEDDING_FILE)
        info = {"dataset": dm.dataset.name, "num_items": dm.num_items,
                "num_users": dm.num_users, "embedding_dim": self.hparams.hidden_size}
        atomic_write_json(out / "embeddings.json", info)
        return info
