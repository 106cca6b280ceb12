"""Self-play negatives: bucket the policy's own beam candidates by difficulty.

A candidate's difficulty is the number of code positions where its SCID equals the target's
SCID (position-wise, not prefix): 0 shared positions = ``easy``, exactly 1 = ``medium``,
2 or more = ``hard``. The target itself is never a negative, nor is any item the caller
forbids (the user's own interactions: they are not negatives, and held-out items must never
enter a training pair).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

BUCKETS = ("easy", "medium", "hard")
# Kinds of rejected items of a preference stage: the model's own beams (by shared code
# positions, or any), random catalogue items, and items the user rated low (real feedback).
SELF_PLAY_KINDS = BUCKETS + ("beam",)
FEEDBACK_KINDS = ("dislike", "neutral")
NEGATIVE_KINDS = SELF_PLAY_KINDS + ("random",) + FEEDBACK_KINDS


def shared_positions(candidate_codes: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """Number of code positions a candidate shares with its target.

    Args:
        candidate_codes: ``[B, W, L]`` codes of W candidates per row.
        target_codes: ``[B, L]`` codes of the row's target.
    Returns:
        ``[B, W]`` long counts in ``0..L``.
    """
    return (candidate_codes == target_codes.unsqueeze(1)).sum(dim=-1)


def bucket_name(shared: int) -> str:
    """``easy`` (0 shared positions), ``medium`` (1) or ``hard`` (>= 2)."""
    if shared <= 0:
        return "easy"
    return "medium" if shared == 1 else "hard"


def bucket_candidates(candidates: torch.Tensor, targets: torch.Tensor, item_codes: torch.Tensor,
                      forbidden: Sequence[Iterable[int]] | None = None
                      ) -> dict[str, list[list[int]]]:
    """Split each row's beam candidates into the three difficulty buckets.

    Args:
        candidates: ``[B, W]`` item ids in beam order (best first), ``-1`` = empty slot.
        targets: ``[B]`` the chosen (ground-truth) item of each row.
        item_codes: ``[num_items, L]`` SCID codes (row = internal item id).
        forbidden: optional per row, item ids that must not become negatives.
    Returns:
        ``{"easy": rows, "medium": rows, "hard": rows}``, each ``rows[b]`` the list of row b's
        candidates of that bucket in beam order, without the target, padding, forbidden items
        and duplicates.
    """
    candidates = candidates.cpu().long()
    targets = targets.cpu().long()
    item_codes = item_codes.cpu()
    if candidates.dim() != 2 or targets.shape != candidates.shape[:1]:
        raise ValueError(f"candidates must be [B, W] and targets [B], got "
                         f"{tuple(candidates.shape)} and {tuple(targets.shape)}")
    valid = candidates >= 0
    shared = shared_positions(item_codes[candidates.clamp(min=0)], item_codes[targets])
    out: dict[str, list[list[int]]] = {name: [] for name in BUCKETS}
    for b in range(candidates.shape[0]):
        banned = {int(targets[b])}
        if forbidden is not None:
            banned.update(int(i) for i in forbidden[b])
        rows = {name: [] for name in BUCKETS}
        for item, ok, k in zip(candidates[b].tolist(), valid[b].tolist(), shared[b].tolist()):
            if not ok or item in banned:
                continue
            banned.add(item)  # drop duplicates too
            rows[bucket_name(k)].append(item)
        for name in BUCKETS:
            out[name].append(rows[name])
    return out


def pad_negatives(negatives: Sequence[Sequence[int]], num_negatives: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``num_negatives`` of each row as ``[B, N]`` ids (``-1`` pad) and a bool mask."""
    ids = torch.full((len(negatives), num_negatives), -1, dtype=torch.long)
    for b, row in enumerate(negatives):
        row = list(row)[:num_negatives]
        if row:
            ids[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return ids, ids >= 0
