"""Shared base of every stage's DataModule: load, split, log statistics, build eval loaders."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.schema import RecDataset
from datamodules.split import LeaveOneOutSplit, leave_one_out

log = logging.getLogger(__name__)

_CACHE: dict[tuple, tuple[RecDataset, LeaveOneOutSplit]] = {}


def _unrepeated_sampler(dataset: Dataset):
    """Each rank gets a disjoint shard with no padded duplicates (exact DDP metrics)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class RecDataModule(L.LightningDataModule):
    """Loads a dataset into the canonical form and splits it chronologically (leave-one-out).

    Args:
        dataset: dataset name (``ml-100k``) or the name of files in ``data_dir``.
        source: ``auto``, ``movielens``, ``recbole`` (atomic files) or ``lcrec_json``.
        data_dir: folder holding the dataset's files (not needed for ``ml-100k``).
        cache_dir: where downloads and parsed datasets are cached
            (default ``$ALIGN3GR_CACHE`` or ``~/.cache/align3gr``).
        kcore: iterative k-core filtering (0 = off; null = the source's default: 5 for raw
            Amazon reviews, as in the papers, 0 for every other source).
        max_history: most recent items a model sees (protocol default 20).
        max_users: keep only the first N users (small slices for tests and smoke runs).
        batch_size: training batch size. eval_batch_size: evaluation batch size.
        num_workers: DataLoader workers.
        run_dir: the pipeline's run directory (stages read earlier stages' artifacts there).
        seed: seed for anything random in data preparation.
    """

    # Stages of the run directory whose artifacts this DataModule reads (their fingerprints and
    # exports are part of a stage's fingerprint; see cli.stage_fingerprint).
    reads_stages: tuple[str, ...] = ()

    def __init__(self, dataset: str = "ml-100k", source: str = "auto",
                 data_dir: str | None = None, cache_dir: str | None = None,
                 kcore: int | None = None,
                 max_history: int = 20, max_users: int | None = None, batch_size: int = 256,
                 eval_batch_size: int = 256, num_workers: int = 0,
                 run_dir: str | None = None, seed: int = 42) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("max_history", max_history)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}")
        if max_users is not None and (not isinstance(max_users, int) or max_users < 1):
            raise ValueError(f"data.max_users must be an integer >= 1 or null, got {max_users!r}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers!r}")
        if kcore is not None and (not isinstance(kcore, int) or kcore < 0):
            raise ValueError(f"data.kcore must be an integer >= 0 or null, got {kcore!r}")
        self.dataset_name = dataset
        self.source = source
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.kcore = kcore
        self.max_history = max_history
        self.max_users = max_users
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.run_dir = run_dir
        self.seed = seed
        self.dataset: RecDataset | None = None
        self.split: LeaveOneOutSplit | None = None

    # -- loading ----------------------------------------------------------------------------
    def _key(self) -> tuple:
        return (self.dataset_name, self.source, self.data_dir, self.cache_dir, self.kcore,
                self.max_users)

    def prepare_data(self) -> None:
        # Downloads and parses once (rank 0); setup() on every rank reads the cache.
        from datamodules.sources import load_dataset
        load_dataset(self.dataset_name, source=self.source, data_dir=self.data_dir,
                     cache_dir=self.cache_dir, kcore=self.kcore)

    def load(self) -> None:
        """Load and split (idempotent; shared across DataModules in one process)."""
        if self.dataset is not None:
            return
        key = self._key()
        if key not in _CACHE:
            from datamodules.sources import load_dataset
            data = load_dataset(self.dataset_name, source=self.source, data_dir=self.data_dir,
                                cache_dir=self.cache_dir, kcore=self.kcore)
            if self.max_users is not None:
                data = _first_users(data, self.max_users)
            split = leave_one_out(data)
            stats = split.statistics()
            log.info("%s: %s", data.name, ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                     else f"{k}={v}" for k, v in stats.items()))
            _CACHE[key] = (data, split)
        self.dataset, self.split = _CACHE[key]

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def num_items(self) -> int:
        self.load()
        return self.dataset.num_items

    @property
    def num_users(self) -> int:
        self.load()
        return self.dataset.num_users

    def statistics(self) -> dict:
        self.load()
        return self.split.statistics()

    # -- loaders ----------------------------------------------------------------------------
    def eval_loader(self, dataset: Dataset, collate_fn=None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          sampler=_unrepeated_sampler(dataset), collate_fn=collate_fn,
                          num_workers=self.num_workers)


def _first_users(data: RecDataset, max_users: int) -> RecDataset:
    """The slice of ``data`` with users ``0..max_users-1`` (items keep their ids)."""
    keep = data.users < max_users
    return RecDataset(
        name=data.name, item_ids=data.item_ids, user_ids=data.user_ids[:max_users],
        users=data.users[keep], items=data.items[keep],
        timestamps=None if data.timestamps is None else data.timestamps[keep],
        ratings=None if data.ratings is None else data.ratings[keep],
        item_features=data.item_features,
        user_features=None if data.user_features is None else data.user_features[:max_users],
        meta={**data.meta, "max_users": max_users},
    )


def pad_left(seqs: list[np.ndarray], length: int, pad: int) -> torch.Tensor:
    """Left-pad (or left-truncate) integer sequences to ``[len(seqs), length]``."""
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out
