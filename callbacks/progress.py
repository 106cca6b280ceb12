"""Plain progress lines for logs: when output goes to a file, a progress bar shows nothing
until a stage ends, so every ``every_n_steps`` training steps one line is logged::

    sft: epoch 2/8, step 1200/4320, loss 1.9312, 412.5 rows/s, 7,310 tokens/s

and one line when an epoch ends (``epoch 2/8 done``).
"""

from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import Callback

from callbacks.timing import _batch_rows, _batch_tokens

log = logging.getLogger("align3gr")


class PlainProgress(Callback):
    def __init__(self, stage: str, every_n_steps: int = 50) -> None:
        super().__init__()
        self.stage = stage
        self.every = max(1, int(every_n_steps))
        self._rows = self._tokens = 0
        self._since = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._since, self._rows, self._tokens = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._rows += _batch_rows(batch)
        self._tokens += _batch_tokens(batch) or 0
        self._step = batch_idx + 1
        if (batch_idx + 1) % self.every or not trainer.is_global_zero:
            return
        self._line(trainer, batch_idx + 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and getattr(self, "_step", 0):
            self._line(trainer, self._step, done=True)
            self._step = 0

    def _line(self, trainer, step: int, done: bool = False) -> None:
        seconds = max(time.perf_counter() - (self._since or time.perf_counter()), 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        total = trainer.num_training_batches
        parts = [f"{self.stage}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
                 + (" done" if done else ""),
                 f"step {step}/{total if total != float('inf') else '?'}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{self._rows / seconds:,.1f} rows/s")
        if self._tokens:
            parts.append(f"{self._tokens / seconds:,.0f} tokens/s")
        log.info(", ".join(parts))
