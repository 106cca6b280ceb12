"""U2I alignment loss: sampled softmax of a user's vector over its positive item and negatives.

For user ``u`` with a training positive ``p`` and ``N`` sampled negatives ``n_1..n_N`` (items the
user never interacted with in training)::

    loss = -log( exp(s(u, p) / t) / (exp(s(u, p) / t) + sum_j exp(s(u, n_j) / t)) )

with ``s`` the cosine similarity (or the dot product when ``normalize=False``). It pulls the user
side and the item side of the tokenizer into one behaviour-aligned space, so that similar users
and the items they like end up with related codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class U2IAlignmentLoss(nn.Module):
    """Sampled-softmax user-to-item loss.

    Args:
        temperature: softmax temperature ``t``.
        normalize: cosine similarity (True) or raw dot product (False).
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize

    def forward(self, users: Tensor, items: Tensor, positives: Tensor, negatives: Tensor,
                negative_mask: Tensor | None = None) -> Tensor:
        """Mean loss over the batch.

        Positives and negatives index one table of item vectors, so every item is normalised
        and scored once per batch instead of once per occurrence (60 negatives per pair would
        otherwise materialise ``[B, 60, d]``).

        Args:
            users: ``[B, d]`` user vectors.
            items: ``[M, d]`` item vectors (e.g. the distinct items of the batch).
            positives: ``[B]`` row in ``items`` of each user's positive item.
            negatives: ``[B, N]`` rows in ``items`` of the sampled negatives.
            negative_mask: ``[B, N]`` bool, False for negatives to ignore (e.g. a sample that
                hit one of the user's positives); None = all valid.
        """
        if self.normalize:
            users, items = F.normalize(users, dim=-1), F.normalize(items, dim=-1)
        scores = users @ items.t()                                        # [B, M]
        logits = torch.cat([scores.gather(1, positives[:, None]),
                            scores.gather(1, negatives)], dim=1)          # [B, 1 + N]
        if negative_mask is not None:
            logits[:, 1:] = logits[:, 1:].masked_fill(~negative_mask, float("-inf"))
        target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits / self.temperature, target)
