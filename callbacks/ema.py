"""EMA of the weights that stays the model after ``fit``: validation, checkpoints, a later
``validate``/``test`` from the best checkpoint and the export all see the averaged weights.

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` keeps its averaged copy
after ``fit``; a ``trainer.validate(ckpt_path="best")`` then reloads the *raw* weights from the
checkpoint's ``current_model_state`` and swaps the average in only for validation, so the test
loop and the export that follow saw the raw weights (validation and test measured different
models). Here the average is dropped when ``fit`` ends: the best checkpoint's ``state_dict``
(the averaged weights) is then what every later loop loads and keeps.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    """EMAWeightAveraging whose averaged weights are final once ``fit`` ends (see the module)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end has copied the average into the module; nothing raw is left to swap.
        self._average_model = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:  # after fit: state_dict already holds the average
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
