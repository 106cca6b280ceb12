"""Chronological leave-one-out split (see the README's protocol section).

Per user, interactions sorted by time (ties keep file order): the last item is the test target,
the second-last the validation target, and every prefix of the rest is a training sample.
Users with fewer than 3 interactions cannot be split and are dropped (the count is logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from datamodules.schema import DataError, RecDataset

log = logging.getLogger(__name__)


@dataclass
class LeaveOneOutSplit:
    """Per-user chronological sequences and the two held-out targets.

    Attributes:
        users: internal user ids that survived (``[U]``, sorted).
        train_items: per kept user, the chronological training items (all but the last two).
        train_ratings: the ratings of ``train_items`` (``None`` without ratings).
        valid_target: ``[U]`` validation target item per user.
        test_target: ``[U]`` test target item per user.
        valid_rating, test_rating: ratings of the targets (``None`` without ratings).
        num_items: catalogue size.
    """

    users: np.ndarray
    train_items: list[np.ndarray]
    train_ratings: list[np.ndarray] | None
    valid_target: np.ndarray
    test_target: np.ndarray
    valid_rating: np.ndarray | None
    test_rating: np.ndarray | None
    num_items: int
    num_dropped_users: int = 0

    def history(self, row: int, stage: str, max_history: int | None = None) -> np.ndarray:
        """History that predicts the ``stage`` target of the ``row``-th kept user.

        ``valid``: all training items; ``test``: training items + the validation item;
        ``predict``: + the test item (everything known, what a recommendation now follows).
        Truncated to the most recent ``max_history`` items when given.
        """
        if stage == "valid":
            hist = self.train_items[row]
        elif stage == "test":
            hist = np.append(self.train_items[row], self.valid_target[row])
        elif stage == "predict":
            hist = np.append(self.train_items[row],
                             [self.valid_target[row], self.test_target[row]])
        else:
            raise ValueError(f"stage must be 'valid', 'test' or 'predict', got {stage!r}")
        if max_history is not None and max_history > 0:
            hist = hist[-max_history:]
        return hist

    def prefix_offsets(self, num_users: int) -> np.ndarray:
        """``[num_users + 1]`` int64 offsets of every user's proper training prefixes, user by
        user (the layout of the causal user states and codes): user ``u``'s prefix of length
        ``p`` (its first ``p`` training items, ``1 <= p < len(train)``) is row
        ``offsets[u] + p - 1``; users without a split (dropped) own no rows."""
        counts = np.zeros(num_users, dtype=np.int64)
        for row, user in enumerate(self.users):
            counts[int(user)] = max(0, len(self.train_items[row]) - 1)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def train_item_counts(self) -> np.ndarray:
        """``[num_items]`` int64: how often each item occurs in the training sequences (the
        held-out targets not counted)."""
        train = [np.asarray(s, dtype=np.int64) for s in self.train_items if len(s)]
        return np.bincount(np.concatenate(train) if train else np.zeros(0, dtype=np.int64),
                           minlength=self.num_items)

    def target(self, stage: str) -> np.ndarray:
        return self.valid_target if stage == "valid" else self.test_target

    def seen_items(self, row: int, stage: str) -> np.ndarray:
        """Every item the user interacted with before the ``stage`` target (untruncated)."""
        return self.history(row, stage, None)

    def statistics(self) -> dict[str, float]:
        lengths = np.array([len(t) + 2 for t in self.train_items])
        return {
            "users": int(len(self.users)),
            "items": int(self.num_items),
            "interactions": int(lengths.sum()),
            "train_interactions": int(lengths.sum() - 2 * len(lengths)),
            "dropped_users": int(self.num_dropped_users),
            "history_min": int(lengths.min()),
            "history_mean": float(lengths.mean()),
            "history_median": float(np.median(lengths)),
            "history_max": int(lengths.max()),
        }


def user_sequences(data: RecDataset) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Chronological (stable by file order on ties) item and rating sequences per user id."""
    n = data.num_interactions
    order_key = data.timestamps if data.timestamps is not None else np.arange(n, dtype=np.float64)
    # lexsort: last key is primary -> group by user, then time, then file order.
    order = np.lexsort((np.arange(n), order_key, data.users))
    users = data.users[order]
    items = data.items[order]
    ratings = data.ratings[order] if data.ratings is not None else None
    bounds = np.searchsorted(users, np.arange(data.num_users + 1))
    seqs = [items[bounds[u]:bounds[u + 1]] for u in range(data.num_users)]
    rats = ([ratings[bounds[u]:bounds[u + 1]] for u in range(data.num_users)]
            if ratings is not None else None)
    return seqs, rats


def leave_one_out(data: RecDataset, min_interactions: int = 3) -> LeaveOneOutSplit:
    """Split ``data`` chronologically; see the module docstring."""
    if min_interactions < 3:
        raise ValueError("leave-one-out needs at least 3 interactions per user")
    seqs, rats = user_sequences(data)
    kept = [u for u, s in enumerate(seqs) if len(s) >= min_interactions]
    dropped = data.num_users - len(kept)
    if dropped:
        log.info("%s: dropped %d users with fewer than %d interactions",
                 data.name, dropped, min_interactions)
    if not kept:
        raise DataError(f"{data.name}: no user has at least {min_interactions} interactions; "
                        "nothing to split")
    has_r = rats is not None
    return LeaveOneOutSplit(
        users=np.asarray(kept, dtype=np.int64),
        train_items=[seqs[u][:-2] for u in kept],
        train_ratings=[rats[u][:-2] for u in kept] if has_r else None,
        valid_target=np.array([seqs[u][-2] for u in kept], dtype=np.int64),
        test_target=np.array([seqs[u][-1] for u in kept], dtype=np.int64),
        valid_rating=np.array([rats[u][-2] for u in kept], dtype=np.float32) if has_r else None,
        test_rating=np.array([rats[u][-1] for u in kept], dtype=np.float32) if has_r else None,
        num_items=data.num_items,
        num_dropped_users=dropped,
    )
