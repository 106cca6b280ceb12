"""DataModule for ID-based sequential recommenders (SASRec): windows of item ids.

Item ids are shifted by one inside batches so that 0 is padding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import RecDataModule, pad_left


class TrainWindows(Dataset):
    """Causal training windows: ``input[j]`` predicts ``target[j]`` (every position trains).

    Windows of at most ``max_history`` inputs end every ``stride`` items from the end of each
    user's training sequence, so recent positions always see a full history. With a random
    generator ``rng``, the windows before the most recent one move forward by a random
    offset in ``[0, stride)`` per user (overlapping the most recent window), so that over
    epochs every position is trained with contexts of every length; every target is still
    trained at least once per epoch (with ``stride = max_history``: once, or twice for the
    overlapped ones).
    """

    def __init__(self, train_items: list[np.ndarray], max_history: int, stride: int,
                 rng: np.random.Generator | None = None) -> None:
        if stride < 1:
            raise ValueError(f"train_stride must be >= 1, got {stride}")
        self.max_history = max_history
        self.windows: list[np.ndarray] = []
        for seq in train_items:
            n = len(seq)
            if n < 2:
                continue
            self.windows.append(seq[max(0, n - max_history - 1):n])
            shift = int(rng.integers(stride)) if rng is not None else 0
            for end in range(n - stride + shift, 1, -stride):
                self.windows.append(seq[max(0, end - max_history - 1):end])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.windows[idx]

    def collate(self, batch: list[np.ndarray]) -> dict[str, torch.Tensor]:
        inputs = pad_left([w[:-1] + 1 for w in batch], self.max_history, 0)
        targets = pad_left([w[1:] + 1 for w in batch], self.max_history, 0)
        return {"input_ids": inputs, "targets": targets}


class EvalUsers(Dataset):
    """One row per kept user: history (truncated), target, and all seen items (to exclude)."""

    def __init__(self, split, stage: str, max_history: int) -> None:
        self.split = split
        self.stage = stage
        self.max_history = max_history
        self.targets = split.target(stage)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, row: int) -> int:
        return row

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        hist = [self.split.history(r, self.stage, self.max_history) + 1 for r in rows]
        seen = [self.split.seen_items(r, self.stage) for r in rows]
        return {
            "rows": torch.as_tensor(rows, dtype=torch.long),
            "input_ids": pad_left(hist, self.max_history, 0),
            "targets": torch.as_tensor(self.targets[rows], dtype=torch.long),
            "seen": pad_left(seen, max(len(s) for s in seen), -1),
        }


class SequentialDataModule(RecDataModule):
    """Leave-one-out data as padded item-id windows.

    Args:
        train_stride: distance between the ends of consecutive training windows of one user
            (1 = a window per training position, like per-prefix augmentation; ``max_history`` =
            each position is a target once).
        (all other arguments: see :class:`datamodules.base.RecDataModule`)
    """

    def __init__(self, *args, train_stride: int = 5, random_shift: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if train_stride < 1:
            raise ValueError(f"data.train_stride must be >= 1, got {train_stride}")
        self.train_stride = train_stride
        self.random_shift = random_shift

    def train_dataloader(self) -> DataLoader:
        self.load()
        epoch = self.trainer.current_epoch if self.trainer else 0
        rng = np.random.default_rng([self.seed, epoch]) if self.random_shift else None
        ds = TrainWindows(self.split.train_items, self.max_history, self.train_stride, rng)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=gen,
                          collate_fn=ds.collate, num_workers=self.num_workers)

    def user_prefix_loader(self) -> tuple[DataLoader, torch.Tensor]:
        """Every proper prefix of every user's training items, for the states before each
        training target: ``(loader, offsets)``; a batch holds ``rows`` (user ``u``'s prefix of
        length ``p`` is row ``offsets[u] + p - 1``) and ``input_ids`` (the prefix's last
        ``max_history`` items, shifted, left-padded with 0)."""
        self.load()
        split, num_users = self.split, self.dataset.num_users
        seqs: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_users
        for row, user in enumerate(split.users):
            seqs[int(user)] = np.asarray(split.train_items[row], dtype=np.int64)
        offsets = torch.from_numpy(split.prefix_offsets(num_users))
        counts = offsets.diff()
        specs = [(u, p) for u in range(num_users) for p in range(1, int(counts[u]) + 1)]
        h = self.max_history

        def collate(rows: list[int]) -> dict[str, torch.Tensor]:
            hist = [seqs[specs[r][0]][max(0, specs[r][1] - h):specs[r][1]] + 1 for r in rows]
            return {"rows": torch.as_tensor(rows, dtype=torch.long),
                    "input_ids": pad_left(hist, h, 0)}

        loader = DataLoader(list(range(len(specs))), batch_size=max(self.eval_batch_size, 1024),
                            shuffle=False, collate_fn=collate)
        return loader, offsets

    def _eval(self, stage: str) -> DataLoader:
        self.load()
        ds = EvalUsers(self.split, stage, self.max_history)
        return self.eval_loader(ds, collate_fn=ds.collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")

    def user_history_loader(self, stage: str = "valid") -> DataLoader:
        """Histories of *all* internal users (for exporting user embeddings) that the
        ``stage`` target follows: ``valid``: training items only; ``test``: + the validation
        item; ``predict``: + the test item (everything known)."""
        self.load()
        split = self.split
        hist = [np.empty(0, dtype=np.int64)] * self.dataset.num_users
        for row, user in enumerate(split.users):
            hist[int(user)] = split.history(row, stage)

        def collate(users: list[int]) -> dict[str, torch.Tensor]:
            return {"users": torch.as_tensor(users, dtype=torch.long),
                    "input_ids": pad_left([hist[u][-self.max_history:] + 1 for u in users],
                                          self.max_history, 0)}

        return DataLoader(list(range(self.dataset.num_users)), batch_size=self.eval_batch_size,
                          shuffle=False, collate_fn=collate)
