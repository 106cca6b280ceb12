"""Worker of ``test_selfplay.py::test_ddp_regeneration_equals_single_process`` (not a test).

    python tests/selfplay_ddp_worker.py RUN_DIR OUT_DIR DEVICES

Fits 2 epochs of self-play DPO (one batch each) with ``DEVICES`` CPU processes (Lightning
DDP re-launches this script for the other ranks) and writes, per rank and epoch, the pairs
every rank holds at the start of the epoch to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import lightning as L  # noqa: E402
from dpo_fixtures import data_kwargs  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from callbacks.selfplay import SelfPlayCallback  # noqa: E402
from cli import end_distributed  # noqa: E402
from datamodules.preference_data import PreferenceDataModule  # noqa: E402
from lightning_modules.preference_aligner import PreferenceAligner, PreferenceStage  # noqa: E402

NUM_BEAMS = 12
BATCH = 8


def make(run_dir: str):
    dm = PreferenceDataModule(**data_kwargs(run_dir), num_negatives=6)
    model = PreferenceAligner(run_dir=run_dir, stages=[PreferenceStage("sp_all", 2, 1e-3)])
    return dm, model, SelfPlayCallback(num_beams=NUM_BEAMS, batch_size=BATCH,
                                       progress_bar=False)


def dump(pairs) -> dict:
    return {"records": pairs.as_records(), "ref_chosen": pairs.ref_chosen.tolist(),
            "ref_rejected": pairs.ref_rejected.tolist()}


class _Dump(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.epochs: dict[str, dict] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs[str(trainer.current_epoch)] = dump(trainer.datamodule.pairs)

    def on_fit_end(self, trainer, pl_module) -> None:
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "epochs": self.epochs}))


def main(run_dir: str, out: str, devices: int) -> None:
    dm, model, selfplay = make(run_dir)
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                        limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[selfplay, _Dump(Path(out))])
    trainer.fit(model, datamodule=dm)
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
