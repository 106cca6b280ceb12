"""The one canonical representation of a recommendation dataset.

Every source (MovieLens archive, RecBole atomic files, LC-Rec/LETTER JSON) is parsed into a
:class:`RecDataset`. Internal ids are dense and 0-based: item ``i`` is ``item_ids[i]`` in the raw
data, user ``u`` is ``user_ids[u]``. Interactions are parallel numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input data. The message names the file and line or record and what was expected."""


@dataclass
class RecDataset:
    """Items, users and interactions of one dataset.

    Attributes:
        name: dataset name, e.g. ``"ml-100k"``.
        item_ids: raw id of every item; the position is the internal item id.
        user_ids: raw id of every user; the position is the internal user id.
        item_features: per item, a dict of text fields (e.g. ``title``, ``genres``);
            ``None`` when the dataset has no item text.
        user_features: per user, a dict of profile fields (e.g. ``age``, ``occupation``);
            ``None`` when the dataset has no user profiles.
        users, items: int64 arrays ``[N]`` of internal ids, one row per interaction.
        timestamps: float64 array ``[N]``; ``None`` when the source is already ordered
            (then the file order is the chronological order).
        ratings: float32 array ``[N]`` of explicit feedback, or ``None``.
    """

    name: str
    item_ids: list[str]
    user_ids: list[str]
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None = None
    ratings: np.ndarray | None = None
    item_features: list[dict[str, str]] | None = None
    user_features: list[dict[str, str]] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        n = len(self.users)
        if len(self.items) != n:
            raise DataError(f"{self.name}: users and items arrays differ in length")
        if self.timestamps is not None:
            self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
            if len(self.timestamps) != n:
                raise DataError(f"{self.name}: timestamps array has the wrong length")
        if self.ratings is not None:
            self.ratings = np.asarray(self.ratings, dtype=np.float32)
            if len(self.ratings) != n:
                raise DataError(f"{self.name}: ratings array has the wrong length")
        if self.item_features is not None and len(self.item_features) != len(self.item_ids):
            raise DataError(f"{self.name}: item_features has {len(self.item_features)} rows "
                            f"for {len(self.item_ids)} items")
        if self.user_features is not None and len(self.user_features) != len(self.user_ids):
            raise DataError(f"{self.name}: user_features has {len(self.user_features)} rows "
                            f"for {len(self.user_ids)} users")

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.users)

    @property
    def has_ratings(self) -> bool:
        return self.ratings is not None

    def item_text(self, item: int, fields: list[str] | None = None) -> str:
        """Text of one item from the given fields (all fields when ``None``); '' without text."""
        if self.item_features is None:
            return ""
        feats = self.item_features[item]
        keys = fields if fields is not None else list(feats)
        return ", ".join(f"{feats[k]}" for k in keys if feats.get(k))

    def user_text(self, user: int, fields: list[str] | None = None) -> str:
        """Profile text of one user, ``key: value`` pairs; '' without profiles."""
        if self.user_features is None:
            return ""
        feats = self.user_features[user]
        keys = fields if fields is not None else list(feats)
        return ", ".join(f"{k}: {feats[k]}" for k in keys if feats.get(k))
