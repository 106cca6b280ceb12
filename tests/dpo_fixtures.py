"""A tiny SFT run directory for the dpo-stage tests (real ML-100K slice, tiny random model).

``make_sft_run(run_dir)`` writes ``tokenizer/scid_map.json`` (random unique 3-level item codes
and user codes) and trains a tiny GenerativeRecommender for a few batches on the first
``max_users`` users, exporting ``sft/hf``. Takes a few seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_modules.components.scid_map import SCIDMap

TINY_BACKBONE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                 "intermediate_size": 64, "text_vocab_size": 300}
MAX_USERS = 30


def random_scid_map(num_items: int = 1682, num_users: int = 943, sizes=(16, 16, 16),
                    seed: int = 0) -> SCIDMap:
    rng = np.random.default_rng(seed)

    def codes(n: int) -> torch.Tensor:
        space = int(np.prod(sizes))
        flat = rng.choice(space, size=n, replace=False)
        return torch.tensor(np.stack(np.unravel_index(flat, sizes), axis=1))

    return SCIDMap(item_codes=codes(num_items), item_codebook_sizes=list(sizes),
                   user_codes=codes(num_users), user_codebook_sizes=list(sizes))


def data_kwargs(run_dir: str | Path, max_users: int = MAX_USERS) -> dict:
    return {"dataset": "ml-100k", "run_dir": str(run_dir), "max_users": max_users,
            "batch_size": 8, "eval_batch_size": 16, "seed": 0}


def shared_sft_run(tmp_path_factory) -> Path:
    """One tiny SFT run per pytest session (built on first use, then reused)."""
    run_dir = tmp_path_factory.getbasetemp() / "dpo_tiny_run"
    if not (run_dir / "sft" / "hf" / "align3gr_sft.json").exists():
        make_sft_run(run_dir)
    return run_dir


def make_sft_run(run_dir: str | Path, max_users: int = MAX_USERS, train_batches: int = 10,
                 backbone: dict | None = None) -> Path:
    """Tokenizer + tiny SFT stage in ``run_dir``; returns ``run_dir/sft/hf``.

    ``backbone`` updates :data:`TINY_BACKBONE` (e.g. ``{"finetuning": "lora"}``)."""
    from datamodules.sft_data import SFTDataModule
    from lightning_modules.generative_recommender import GenerativeRecommender

    run_dir = Path(run_dir)
    random_scid_map().save(run_dir / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = SFTDataModule(**data_kwargs(run_dir, max_users))
    model = GenerativeRecommender(run_dir=str(run_dir),
                                  backbone={**TINY_BACKBONE, **(backbone or {})}, lr=3e-3,
                                  export_on_fit_end=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=train_batches, limit_val_batches=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    model.export_artifacts()
    return run_dir / "sft" / "hf"
