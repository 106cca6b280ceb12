"""Where a stage's time goes: training vs validation vs test, throughput, decoding speed.

:class:`StageTimer` is added by ``cli.py pipeline`` to every stage's Trainer; its
:meth:`StageTimer.summary` goes into the stage's ``stage.json`` under ``timing`` and is what
``bench/bench_pipeline.py`` prints. It only reads clocks and batch sizes, so it changes
nothing a stage computes.

Batches are counted by what they carry: ``attention_mask`` (tokens = its sum), ``targets`` of
an id model (tokens = non-padding targets), ``prompts`` of preference pairs (rows only); eval
batches by ``rows``, ``targets`` or ``target``.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from callbacks.resume import FitResumeState


def _batch_rows(batch) -> int:
    if isinstance(batch, dict):
        for key in ("rows", "prompts", "input_ids", "targets", "target", "users"):
            value = batch.get(key)
            if value is not None:
                return int(value.shape[0]) if isinstance(value, torch.Tensor) else len(value)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_rows(batch[0]) if isinstance(batch[0], dict) else len(batch)
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return 0


def _batch_tokens(batch) -> int | None:
    if not isinstance(batch, dict):
        return None
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    targets = batch.get("targets")
    if isinstance(targets, torch.Tensor) and targets.dim() == 2:
        return int((targets > 0).sum())
    return None


class StageTimer(FitResumeState):
    """Wall-clock seconds per phase of a stage and its training/decoding throughput.

    Phases: ``fit`` (all of ``Trainer.fit``), inside it ``fit_validation`` (validation loops),
    and ``train`` (= fit - fit_validation - other callbacks' epoch-boundary work such as
    self-play generation, which its callback reports); after fit ``validate`` and ``test``
    (the final evaluations of the selected checkpoint). ``export`` is set by the caller.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.train_rows = 0
        self.train_tokens = 0
        self.has_tokens = False
        self.epochs = 0
        self.eval_users: dict[str, int] = {}
        self._start: dict[str, float] = {}
        self._batch_start: float | None = None
        self.train_step_seconds = 0.0
        self._stage_start: float | None = None
        self.seconds_before_resume = 0.0  # earlier attempts of a resumed stage (see state_dict)

    # -- the stage's clock across a kill ----------------------------------------------------------
    def begin_stage(self) -> None:
        """Start the stage's clock (the caller's; :meth:`stage_seconds` reads it)."""
        self._stage_start = time.perf_counter()

    def stage_seconds(self) -> float:
        """Seconds of this stage so far: this process's since :meth:`begin_stage`, plus those
        that earlier, killed attempts spent up to the checkpoint this one resumed from."""
        now = time.perf_counter()
        return self.seconds_before_resume + (now - self._stage_start
                                             if self._stage_start is not None else 0.0)

    def state_dict(self) -> dict:
        # Saved into every checkpoint: a resumed fit continues these totals, so a killed and
        # resumed stage reports the epochs, rows and seconds of the whole computation (the
        # work a killed attempt did after its last checkpoint is done again and counted once).
        seconds = dict(self.seconds)
        for key, start in self._start.items():  # phases still open (fit) count up to now
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        return {"stage_seconds": self.stage_seconds(), "seconds": seconds,
                "train_rows": self.train_rows, "train_tokens": self.train_tokens,
                "has_tokens": self.has_tokens, "epochs": self.epochs,
                "eval_users": dict(self.eval_users),
                "train_step_seconds": self.train_step_seconds}

    def load_state_dict(self, state: dict) -> None:
        if not (self._resuming_fit() and state):  # not the best checkpoint of validate/test
            return
        # Added to what this process measured before the fit (a pre-fit validation).
        self.seconds_before_resume += float(state.get("stage_seconds", 0.0))
        for key, value in (state.get("seconds") or {}).items():
            self.seconds[key] = self.seconds.get(key, 0.0) + float(value)
        for key, value in (state.get("eval_users") or {}).items():
            self.eval_users[key] = self.eval_users.get(key, 0) + int(value)
        self.train_rows += int(state.get("train_rows", 0))
        self.train_tokens += int(state.get("train_tokens", 0))
        self.has_tokens = self.has_tokens or bool(state.get("has_tokens"))
        self.epochs += int(state.get("epochs", 0))
        self.train_step_seconds += float(state.get("train_step_seconds", 0.0))

    def _begin(self, key: str) -> None:
        self._start[key] = time.perf_counter()

    def _end(self, key: str) -> None:
        start = self._start.pop(key, None)
        if start is not None:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    @staticmethod
    def _phase(trainer: L.Trainer) -> str:
        fn = getattr(trainer.state.fn, "value", str(trainer.state.fn))
        return "fit_validation" if fn == "fit" else "validate"

    # -- fit ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._begin("fit")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._end("fit")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self.train_step_seconds += time.perf_counter() - self._batch_start
            self._batch_start = None
        self.train_rows += _batch_rows(batch)
        tokens = _batch_tokens(batch)
        if tokens is not None:
            self.has_tokens = True
            self.train_tokens += tokens

    # -- evaluation -----------------------------------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._begin(self._phase(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._end(self._phase(trainer))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            key = self._phase(trainer)
            self.eval_users[key] = self.eval_users.get(key, 0) + _batch_rows(batch)

    def on_test_start(self, trainer, pl_module) -> None:
        self._begin("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._end("test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0) -> None:
        self.eval_users["test"] = self.eval_users.get("test", 0) + _batch_rows(batch)

    # -- summary --------------------------------------------------------------------------------
    def summary(self, extra: dict[str, float] | None = None) -> dict:
        """Seconds per phase, epochs, throughput; ``extra`` adds phases (e.g. ``export``,
        ``selfplay``), which are taken out of ``train`` when they happened inside fit."""
        sec = dict(self.seconds)
        sec.update(extra or {})
        inside = sec.get("fit_validation", 0.0) + sec.get("selfplay", 0.0)
        if "fit" in sec:
            sec["train"] = max(0.0, sec["fit"] - inside)
        out = {"seconds": {k: round(v, 2) for k, v in sec.items()}, "epochs": self.epochs,
               "train_rows": self.train_rows}
        steps = self.train_step_seconds
        if steps > 0:
            out["train_rows_per_s"] = round(self.train_rows / steps, 1)
            if self.has_tokens:
                out["train_tokens"] = self.train_tokens
                out["train_tokens_per_s"] = round(self.train_tokens / steps, 1)
        for phase, users in self.eval_users.items():
            if sec.get(phase, 0) > 0:
                out[f"{phase}_users"] = users
                out[f"{phase}_users_per_s"] = round(users / sec[phase], 1)
        return out
