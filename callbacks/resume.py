"""What a killed stage needs to continue where it stopped, with the same result.

:func:`last_checkpoint` saves ``last.ckpt`` at the end of every training epoch (model,
optimizer, scheduler, loops, callback states); :class:`RNGState` puts the python, numpy and
torch random states into every checkpoint and restores them on resume, so a resumed fit draws
the same shuffles and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

LAST = "last"  # checkpoints/last.ckpt
LAST_FILE = f"{LAST}.ckpt"
PARTIAL_FILE = f"{LAST_FILE}.partial"  # a write in progress (renamed to LAST_FILE when whole)


class FitResumeState(Callback):
    """A callback whose state only a resumed fit restores.

    Lightning restores callback states whenever a checkpoint is loaded, also when
    ``validate``/``test`` load the best one after fit, which would roll totals such as a
    stage's timing or self-play history back to that epoch. Subclasses call
    :meth:`_resuming_fit` first in ``load_state_dict`` and return when it is false.
    """

    _fit_restore = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._fit_restore = getattr(trainer.state.fn, "value", str(trainer.state.fn)) == "fit"

    def _resuming_fit(self) -> bool:
        """Whether the state being loaded resumes a fit (answers once per load)."""
        resuming, self._fit_restore = self._fit_restore, False
        return resuming


class RNGState(Callback):
    """Random states in the checkpoint (saved with it, restored before training resumes)."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain types and tensors only: checkpoints load with torch.load(weights_only=True).
        state = {"python": random.getstate(),
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                           int(has_gauss), float(gauss)],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """Writes only ``<dirpath>/last.ckpt``, at the end of every training epoch.

    ``ModelCheckpoint(save_top_k=0, save_last=True)`` alone no longer does that: since
    Lightning 2.6 it writes ``last`` at an epoch's end only when a top-k checkpoint was saved at
    the same step, so without top-k it wrote ``last.ckpt`` once, when training ended, and a
    killed stage started over. The write goes to a temporary file first: a kill during it
    leaves the previous ``last.ckpt`` whole. Being a ``ModelCheckpoint``, it runs after the
    LightningModule's own ``on_train_epoch_end`` (the state the next epoch starts from).
    """

    CHECKPOINT_NAME_LAST = LAST

    def __init__(self, dirpath: str | Path):
        super().__init__(dirpath=str(dirpath), save_top_k=0, save_last=True, every_n_epochs=1,
                         save_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        partial = str(Path(filepath).with_name(PARTIAL_FILE))
        super()._save_checkpoint(trainer, partial)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, filepath)


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """The callback that writes ``<dirpath>/last.ckpt`` after every training epoch."""
    return LastCheckpoint(dirpath)
