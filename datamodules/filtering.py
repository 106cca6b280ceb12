"""Iterative k-core filtering of a :class:`RecDataset`."""

from __future__ import annotations

import logging

import numpy as np

from datamodules.schema import DataError, RecDataset

log = logging.getLogger(__name__)


def kcore_filter(data: RecDataset, k: int) -> RecDataset:
    """Keep the largest subset where every user and every item has at least ``k`` interactions.

    Interactions (not distinct pairs) are counted. Removing a sparse item can push a user
    below ``k`` and vice versa, so both sides are pruned until nothing changes. Survivors are
    re-indexed densely in their old relative order (so raw-id order is preserved); interaction
    order, timestamps, ratings and features follow. Items without interactions are dropped.

    Args:
        data: the dataset.
        k: minimum interactions per user and per item; ``k <= 0`` returns ``data`` unchanged.

    Raises:
        DataError: nothing is left.
    """
    if k <= 0:
        return data
    keep = np.ones(data.num_interactions, dtype=bool)
    while True:
        user_counts = np.bincount(data.users[keep], minlength=data.num_users)
        item_counts = np.bincount(data.items[keep], minlength=data.num_items)
        still = keep & (user_counts[data.users] >= k) & (item_counts[data.items] >= k)
        if still.sum() == keep.sum():
            break
        keep = still
    if not keep.any():
        raise DataError(f"{data.name}: dataset is empty after k-core filtering (k={k}); "
                        f"{data.num_users} users, {data.num_items} items and "
                        f"{data.num_interactions} interactions went in. Use a smaller kcore.")

    kept_users = np.unique(data.users[keep])  # sorted: keeps the old relative order
    kept_items = np.unique(data.items[keep])
    user_map = np.full(data.num_users, -1, dtype=np.int64)
    user_map[kept_users] = np.arange(len(kept_users))
    item_map = np.full(data.num_items, -1, dtype=np.int64)
    item_map[kept_items] = np.arange(len(kept_items))

    out = RecDataset(
        name=data.name,
        item_ids=[data.item_ids[i] for i in kept_items],
        user_ids=[data.user_ids[u] for u in kept_users],
        users=user_map[data.users[keep]],
        items=item_map[data.items[keep]],
        timestamps=None if data.timestamps is None else data.timestamps[keep],
        ratings=None if data.ratings is None else data.ratings[keep],
        item_features=(None if data.item_features is None
                       else [data.item_features[i] for i in kept_items]),
        user_features=(None if data.user_features is None
                       else [data.user_features[u] for u in kept_users]),
        meta={**data.meta, "kcore": k},
    )
    log.info("%s: %d-core kept %d/%d users, %d/%d items, %d/%d interactions", data.name, k,
             out.num_users, data.num_users, out.num_items, data.num_items,
             out.num_interactions, data.num_interactions)
    return out
