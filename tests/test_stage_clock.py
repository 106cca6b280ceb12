"""A stage's clock and counters survive a kill: the timer's totals travel in the checkpoint and
a resumed fit continues them, while the checkpoint that validate/test load afterwards (the best
epoch's) does not roll them back. The same holds for the self-play history."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.resume import LAST_FILE, last_checkpoint
from callbacks.selfplay import SelfPlayCallback
from callbacks.timing import StageTimer


class FirstEpochBest(BoringModel):
    """Validation gets worse every epoch, so the best checkpoint is the first one."""

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -float(self.current_epoch))
        return super().validation_step(batch, batch_idx)


def _trainer(tmp_path, epochs: int, timer: StageTimer) -> L.Trainer:
    torch.manual_seed(0)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", filename="best")
    return L.Trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=2,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", callbacks=[timer, best, last_checkpoint(tmp_path)])


def test_resumed_fit_continues_the_totals_and_validate_does_not_roll_them_back(tmp_path):
    whole = StageTimer()
    whole.begin_stage()
    trainer = _trainer(tmp_path / "whole", 3, whole)
    trainer.fit(FirstEpochBest())
    trainer.validate(ckpt_path=str(tmp_path / "whole" / "best.ckpt"), verbose=False)
    assert whole.epochs == 3 and whole.train_rows == 3 * 4  # BoringModel: one row a batch
    assert whole.seconds_before_resume == 0.0

    # The same fit killed after its first epoch: a new process resumes from last.ckpt.
    first = StageTimer()
    first.begin_stage()
    _trainer(tmp_path / "killed", 1, first).fit(FirstEpochBest())
    resumed = StageTimer()
    resumed.begin_stage()
    trainer = _trainer(tmp_path / "killed", 3, resumed)
    trainer.fit(FirstEpochBest(), ckpt_path=str(tmp_path / "killed" / LAST_FILE))
    trainer.validate(ckpt_path=str(tmp_path / "killed" / "best.ckpt"), verbose=False)
    assert resumed.epochs == whole.epochs and resumed.train_rows == whole.train_rows
    assert resumed.eval_users["fit_validation"] == whole.eval_users["fit_validation"]
    assert 0.0 < resumed.seconds_before_resume <= first.stage_seconds()
    assert resumed.stage_seconds() > resumed.seconds_before_resume
    summary = resumed.summary()
    assert summary["seconds"]["fit"] >= first.seconds["fit"]
    assert summary["epochs"] == 3


def test_selfplay_history_is_restored_only_when_a_fit_resumes():
    callback = SelfPlayCallback()
    callback.history = [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]
    saved = {"pairs_epoch": 0, "history": [{"epoch": 0}]}
    for fn in ("validate", "test"):
        callback.on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn=fn)), None, {})
        callback.load_state_dict(saved)
        assert len(callback.history) == 3, fn
    callback.on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn="fit")), None, {})
    callback.load_state_dict(saved)
    assert callback.history == [{"epoch": 0}] and callback._resume_epoch == 0
