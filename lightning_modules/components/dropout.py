"""Dropout whose mask comes from ``torch.rand``.

On CPU, ``torch.nn.functional.dropout`` draws its mask with Bernoulli sampling, which costs
2-3x a uniform draw and a comparison; in the project's small models it was up to a quarter of
a training step (SASRec). Same distribution (inverted dropout: kept values scaled by
``1 / (1 - p)``), seeded by torch's global generator, identity in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout of ``x`` with drop probability ``p`` (a no-op unless ``training``)."""
    if not training or p <= 0:
        return x
    # The uniform draw becomes the scaled mask in place (ge_ writes 1.0/0.0 in x's dtype):
    # one multiplication forward and backward instead of a bool mask, a type promotion and
    # a division (fwd + bwd of a [32, 75, 128] activation: 4.4 ms against 7.1 ms, one thread).
    mask = torch.rand(x.shape, device=x.device, dtype=x.dtype).ge_(p).mul_(1.0 / (1.0 - p))
    return x * mask


class FastDropout(nn.Dropout):
    """Drop-in :class:`torch.nn.Dropout` (same ``p`` and state dict) using :func:`fast_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def replace_dropout(module: nn.Module) -> int:
    """Swap every :class:`torch.nn.Dropout` inside ``module`` for a :class:`FastDropout`;
    returns how many were swapped."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Dropout:
            setattr(module, name, FastDropout(child.p, inplace=False))
            count += 1
        else:
            count += replace_dropout(child)
    return count
