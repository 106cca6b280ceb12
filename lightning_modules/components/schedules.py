"""Learning-rate schedules shared by the stages."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total: int, warmup_ratio: float,
                         min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` of ``total``: linear warm-up over
    ``warmup_ratio * total`` steps (at least one), then cosine decay to ``min_lr_ratio``."""
    total = max(1, total)
    warmup = max(1, int(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                  min_lr_ratio: float) -> dict:
    """Lightning ``lr_scheduler`` config stepping :func:`warmup_cosine_factor` every step."""
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_ratio,
                                                     min_lr_ratio))
    return {"scheduler": sched, "interval": "step"}
