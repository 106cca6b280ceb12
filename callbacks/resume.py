"""What a killed stage needs to continue where it stopped, with the same result.

:func:`last_checkpoint` saves ``last.ckpt`` at the end of every training epoch (model,
optimizer, scheduler, loops, callback states); :class:`RNGState` puts the python, numpy and
torch random states into every checkpoint and restores them on resume, so a resumed fit draws
the same shuffles and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

LAST = "last"  # checkpoints/last.ckpt


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


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """A checkpoint callback that only writes ``<dirpath>/last.ckpt``, after every epoch."""
    cb = ModelCheckpoint(dirpath=str(dirpath), save_top_k=0, save_last=True,
                         every_n_epochs=1, save_on_train_epoch_end=True)
    cb.CHECKPOINT_NAME_LAST = LAST
    return cb
