"""The tokenizer's two-phase loss schedule (Align3GR §1).

Phase 1 (the first ``phase1_epochs`` epochs): alpha=1 (U2I), gamma=0 (quantization), so the SC
encoders first align users with the items they interact with. Phase 2: alpha=0.1, gamma=1, so
the quantizers learn the codes while the alignment is kept. The callback only sets the module's
``alpha`` and ``gamma`` attributes, so it works with any module that reads them. A module whose
``u2i`` attribute is False (the no-U2I ablation) has nothing to align, so it starts in phase 2.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class TwoPhaseLossSchedule(Callback):
    """Set ``pl_module.alpha`` / ``pl_module.gamma`` at the start of every training epoch.

    Args:
        phase1_epochs: epochs of phase 1 (0 = start in phase 2).
        phase1_alpha, phase1_gamma: loss weights of phase 1 (paper: 1.0, 0.0).
        phase2_alpha, phase2_gamma: loss weights of phase 2 (paper: 0.1, 1.0).
    """

    def __init__(self, phase1_epochs: int = 5, phase1_alpha: float = 1.0,
                 phase1_gamma: float = 0.0, phase2_alpha: float = 0.1,
                 phase2_gamma: float = 1.0) -> None:
        self.phase1_epochs = phase1_epochs
        self.phase1 = (phase1_alpha, phase1_gamma)
        self.phase2 = (phase2_alpha, phase2_gamma)

    def weights(self, epoch: int) -> tuple[float, float]:
        """(alpha, gamma) of ``epoch`` (0-based)."""
        return self.phase1 if epoch < self.phase1_epochs else self.phase2

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "u2i", True):
            pl_module.alpha, pl_module.gamma = self.weights(trainer.current_epoch)
        else:
            pl_module.alpha, pl_module.gamma = self.phase2
