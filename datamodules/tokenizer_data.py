"""Data of the tokenizer stage: per-entity SC input features and U2I training pairs.

Per entity (item or user) the input vector is the concatenation of

- a semantic block: the frozen text encoder over the item's text fields / the user's profile
  fields (a user without a profile gets the mean of its training items' text vectors);
- a collaborative block: the sasrec stage's embeddings (``<run_dir>/sasrec/item_embeddings.pt``,
  ``user_embeddings.pt``).

Each block is L2-normalised per row, so text and behaviour weigh the same in the reconstruction
whatever their widths and scales; ``collaborative_weight`` then scales the collaborative block
(the balance of the two in the fusion's input and in the RQ-VAE's reconstruction target, whose
squared error weighs that block by its square). ``features`` picks the blocks (the ablation
switch); a dataset without item text runs collaborative-only.

``collaborative_smoothing`` (a pseudo-count ``k``; 0 = off) shrinks each item's collaborative
row toward its training neighbours (:func:`neighbour_smoothed`): an item seen ``c`` times in
the training sequences keeps weight ``c / (c + k)`` on its own SASRec embedding and gives
``k / (c + k)`` to the mean of the items next to it there. Rarely seen items, whose SASRec
rows carry little signal of their own, then sit with the items they occur beside.

Training batches are (user, positive item) pairs from the training split only, each with
``num_negatives`` items sampled uniformly among those the user has no training interaction with.
The validation loader yields one batch holding every entity id, so the model can report codebook
utilization and collisions over the whole catalogue cheaply.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.base import RecDataModule
from datamodules.schema import DataError
from lightning_modules.components.artifacts import (
    USER_EMBEDDING_FILES,
    USER_PREFIX_EMBEDDING_FILE,
    load_tensor,
    read_stage,
    stage_dir,
)
from lightning_modules.components.scid_map import REFRESHED_SPLITS
from lightning_modules.components.text_encoder import TextEncoder
from lightning_modules.components.threads import pinned_threads

log = logging.getLogger(__name__)

SASREC_STAGE = "sasrec"


def _embedding_file(path, rows: int, width: int | None = None) -> Tensor:
    """A sasrec embedding file as a float ``[rows, width]`` tensor (any width when None)."""
    emb = load_tensor(path, SASREC_STAGE, "SASRec embeddings (a float tensor file)")
    if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] != rows or \
            (width is not None and emb.shape[1] != width):
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"{path}: expected a float tensor [{rows}, {width or 'd'}], "
                         f"got {shape}")
    return emb.float()


def load_collaborative_embeddings(run_dir: str, dataset: str, num_items: int,
                                  num_users: int) -> tuple[Tensor, Tensor, dict]:
    """Item ``[num_items, d]`` and user ``[num_users, d]`` embeddings of the sasrec stage.

    Raises:
        FileNotFoundError: the sasrec stage has not finished in ``run_dir``.
        ValueError: its artifacts belong to another dataset or catalogue.
    """
    info = read_stage(run_dir, SASREC_STAGE)
    folder = stage_dir(run_dir, SASREC_STAGE)
    marker = folder / "stage.json"
    if info.get("dataset") not in (None, dataset):
        raise ValueError(f"{marker}: sasrec was trained on dataset {info.get('dataset')!r}, "
                         f"but the tokenizer runs on {dataset!r}; rerun the 'sasrec' stage")
    for key, expected in (("num_items", num_items), ("num_users", num_users)):
        if key in info and int(info[key]) != expected:
            raise ValueError(f"{marker}: {key}={info[key]} but the dataset has {expected}; "
                             "rerun the 'sasrec' stage on the same data (same max_users/kcore)")
    tensors = []
    for name, rows in (("item_embeddings.pt", num_items), ("user_embeddings.pt", num_users)):
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing although {marker} exists; rerun the "
                                    "'sasrec' stage")
        tensors.append(_embedding_file(path, rows))
    if tensors[0].shape[1] != tensors[1].shape[1]:
        raise ValueError(f"{folder}: item and user embeddings differ in width "
                         f"({tensors[0].shape[1]} vs {tensors[1].shape[1]})")
    return tensors[0], tensors[1], info


def load_refreshed_user_embeddings(run_dir: str, num_users: int,
                                   width: int) -> dict[str, Tensor]:
    """The sasrec stage's user states after the later splits' longer histories
    (``{"test": [num_users, d], "predict": ...}``), those it exported; a sasrec stage made
    before they existed has none, and its users get no refreshed SCIDs."""
    folder = stage_dir(run_dir, SASREC_STAGE)
    out = {}
    for split, name in USER_EMBEDDING_FILES.items():
        path = folder / name
        if split == "valid" or not path.exists():
            continue
        out[split] = _embedding_file(path, num_users, width)
    return out


def load_prefix_user_embeddings(run_dir: str, num_users: int,
                                 width: int) -> tuple[Tensor, Tensor] | None:
    """The sasrec stage's user states before every training target, ``(states [P, d],
    offsets [num_users + 1])`` (see :data:`USER_PREFIX_EMBEDDING_FILE`); None from a sasrec
    stage made before it exported them."""
    path = stage_dir(run_dir, SASREC_STAGE) / USER_PREFIX_EMBEDDING_FILE
    if not path.exists():
        return None
    blob = load_tensor(path, SASREC_STAGE, "SASRec prefix states (states and offsets)")
    states = blob.get("states") if isinstance(blob, dict) else None
    offsets = blob.get("offsets") if isinstance(blob, dict) else None
    if not isinstance(states, Tensor) or not isinstance(offsets, Tensor) or \
            states.dim() != 2 or states.shape[1] != width or offsets.dim() != 1 or \
            len(offsets) != num_users + 1 or int(offsets[-1]) != states.shape[0]:
        raise ValueError(f"{path}: expected {{'states': float [P, {width}], 'offsets': "
                         f"long [{num_users + 1}]}} with offsets[-1] == P")
    return states.float(), offsets.long()


def neighbour_smoothed(embeddings: Tensor, sequences, k: float) -> Tensor:
    """``embeddings [num_items, d]`` shrunk toward their neighbours in ``sequences``.

    Per item ``i`` seen ``c_i`` times in ``sequences`` (the training sequences, in order), with
    ``m_i`` the mean of the L2-normalised rows of the items right before and right after its
    occurrences: ``(c_i * e_i + k * m_i) / (c_i + k)``, ``e_i`` its L2-normalised row. Items
    without a neighbour (never seen, or only in one-item sequences) keep ``e_i``.
    """
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"the smoothing pseudo-count must be a finite number >= 0, got {k!r}")
    unit = F.normalize(embeddings.float(), dim=1)
    if k == 0:
        return unit
    num_items = unit.shape[0]
    # One empty array keeps the concatenations defined when no sequence holds an item.
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences] or [np.zeros(0, dtype=np.int64)]
    left = np.concatenate([s[:-1] for s in seqs])
    right = np.concatenate([s[1:] for s in seqs])
    flat = np.concatenate(seqs)
    if len(flat) and (flat.min() < 0 or flat.max() >= num_items):
        raise ValueError(f"the sequences hold item ids outside 0..{num_items - 1}")
    counts = np.bincount(flat, minlength=num_items)
    # Each adjacent pair (a, b) makes b a neighbour of a and a a neighbour of b.
    ends = torch.from_numpy(np.concatenate([left, right]))
    others = torch.from_numpy(np.concatenate([right, left]))
    sums = torch.zeros_like(unit).index_add_(0, ends, unit[others])
    degree = torch.bincount(ends, minlength=num_items).to(unit.dtype)[:, None]
    mean = sums / degree.clamp(min=1)
    c = torch.from_numpy(counts).to(unit.dtype)[:, None]
    return torch.where(degree > 0, (c * unit + k * mean) / (c + k), unit)


class TokenizerDataModule(RecDataModule):
    """Inputs and U2I pairs of the tokenizer stage (see the module docstring).

    Args:
        features: input blocks: ``both`` (semantic + collaborative), ``semantic`` or
            ``collaborative``. ``both`` falls back to collaborative-only when the dataset has
            no item text.
        text_encoder: the frozen sentence encoder (None = bundled all-MiniLM-L6-v2).
        item_text_fields: item fields that make the item text (None = all, in source order).
        user_text_fields: user profile fields that make the user text (None = all).
        collaborative_weight: scale of the L2-normalised collaborative block against the
            semantic one (1 = equal norms; 2 = behaviour counts four times as much in the
            reconstruction). Used only when both blocks are present.
        collaborative_smoothing: pseudo-count ``k`` of the shrinkage of each item's
            collaborative row toward its training neighbours (see the module docstring;
            0 = the SASRec rows as they are).
        num_negatives: negatives per (user, positive) pair for the U2I loss (paper: 60).
        batch_size: (user, positive) pairs per training batch.
        **kwargs: :class:`~datamodules.base.RecDataModule` arguments (``dataset``,
            ``max_users``, ``run_dir``, ``cache_dir``, ``seed``, ...).
    """

    reads_stages = ("sasrec",)  # the collaborative embeddings

    def __init__(self, features: Literal["both", "semantic", "collaborative"] = "both",
                 text_encoder: TextEncoder | None = None,
                 item_text_fields: list[str] | None = None,
                 user_text_fields: list[str] | None = None,
                 collaborative_weight: float = 1.0, num_negatives: int = 60,
                 batch_size: int = 1024, collaborative_smoothing: float = 0.0,
                 **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if features not in ("both", "semantic", "collaborative"):
            raise ValueError(f"features must be both|semantic|collaborative, got {features!r}")
        if isinstance(collaborative_weight, bool) or \
                not isinstance(collaborative_weight, (int, float)) or \
                not math.isfinite(collaborative_weight) or collaborative_weight <= 0:
            raise ValueError("data.init_args.collaborative_weight must be a finite number > 0, "
                             f"got {collaborative_weight!r}")
        if isinstance(collaborative_smoothing, bool) or \
                not isinstance(collaborative_smoothing, (int, float)) or \
                not math.isfinite(collaborative_smoothing) or collaborative_smoothing < 0:
            raise ValueError("data.init_args.collaborative_smoothing must be a finite number "
                             f">= 0, got {collaborative_smoothing!r}")
        self.collaborative_smoothing = float(collaborative_smoothing)
        self.features = features
        self.collaborative_weight = float(collaborative_weight)
        self.text_encoder = text_encoder
        self.item_text_fields = item_text_fields
        self.user_text_fields = user_text_fields
        self.num_negatives = num_negatives
        self.item_x: Tensor | None = None   # [num_items, D]
        self.user_x: Tensor | None = None   # [num_users, D]
        # The same users' inputs from the later splits' histories (test, predict), when every
        # block has them: the tokenizer exports refreshed user SCIDs from these.
        self.user_x_refreshed: dict[str, Tensor] = {}
        # The users' inputs before every training target (prefix rows, ``offsets`` per user;
        # see USER_PREFIX_EMBEDDING_FILE): the tokenizer exports causal user codes from these.
        self.user_x_prefix: Tensor | None = None
        self.user_prefix_offsets: Tensor | None = None
        self.info: dict = {}

    # -- features ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.load()
        if self.item_x is not None:
            return
        data, split = self.dataset, self.split
        blocks_items, blocks_users, used = [], [], []
        refreshed: dict[str, list[Tensor]] | None = {s: [] for s in REFRESHED_SPLITS}
        prefix_blocks: list[tuple[Tensor, bool]] | None = []  # (block, one row per user)
        if self.features in ("both", "semantic"):
            if data.item_features is None:
                if self.features == "semantic":
                    raise DataError(f"{data.name}: features='semantic' but the dataset has no "
                                    "item text; use features='collaborative'")
                log.warning("%s: no item text; tokenizing from collaborative features only",
                            data.name)
            else:
                sem_items, sem_users = self._semantic()
                blocks_items.append(sem_items)
                blocks_users.append(sem_users)
                used.append("semantic")
                for later, blocks in refreshed.items():
                    blocks.append(sem_users if data.user_features is not None
                                  else self._mean_item_texts(sem_items, later))
                prefix_blocks.append((sem_users, True) if data.user_features is not None
                                     else (self._prefix_mean_item_texts(sem_items), False))
        if self.features in ("both", "collaborative"):
            if self.run_dir is None:
                raise ValueError("the tokenizer's collaborative features come from the 'sasrec' "
                                 "stage: set data.init_args.run_dir (or features='semantic')")
            items, users, sasrec_info = load_collaborative_embeddings(
                self.run_dir, data.name, data.num_items, data.num_users)
            if self.collaborative_smoothing > 0:
                items = neighbour_smoothed(items, split.train_items,
                                           self.collaborative_smoothing)
            blocks_items.append(items)
            blocks_users.append(users)
            used.append("collaborative")
            later_users = load_refreshed_user_embeddings(self.run_dir, data.num_users,
                                                         users.shape[1])
            if set(later_users) == set(refreshed):
                for later, blocks in refreshed.items():
                    blocks.append(later_users[later])
            else:
                log.info("the sasrec stage exported no user states after the later splits' "
                         "histories: no refreshed user SCIDs")
                refreshed = None
            prefix = load_prefix_user_embeddings(self.run_dir, data.num_users, users.shape[1])
            if prefix is None:
                log.info("the sasrec stage exported no user states before the training "
                         "targets: no causal user SCIDs")
                prefix_blocks = None
            else:
                prefix_blocks.append((prefix[0], False))
                self.user_prefix_offsets = prefix[1]
            self.info["sasrec_fingerprint"] = sasrec_info.get("fingerprint", "")
            if self.collaborative_smoothing > 0:  # (absent when off: exports as before it)
                self.info["collaborative_smoothing"] = self.collaborative_smoothing
        # Zero rows (users without training items) stay zero under F.normalize.
        weights = [self.collaborative_weight if name == "collaborative" and len(used) > 1
                   else 1.0 for name in used]
        self.item_x = torch.cat([w * F.normalize(b, dim=1)
                                 for w, b in zip(weights, blocks_items)], dim=1)
        self.user_x = torch.cat([w * F.normalize(b, dim=1)
                                 for w, b in zip(weights, blocks_users)], dim=1)
        self.user_x_refreshed = {} if refreshed is None else {
            later: torch.cat([w * F.normalize(b, dim=1) for w, b in zip(weights, blocks)], dim=1)
            for later, blocks in refreshed.items()}
        if prefix_blocks and self.user_prefix_offsets is not None:
            counts = self.user_prefix_offsets.diff()
            owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
            self.user_x_prefix = torch.cat(
                [w * F.normalize(b[owner] if per_user else b, dim=1)
                 for w, (b, per_user) in zip(weights, prefix_blocks)], dim=1)

        pair_users = np.concatenate([np.full(len(items), user) for user, items
                                     in zip(split.users, split.train_items)]).astype(np.int64)
        pair_items = np.concatenate(split.train_items).astype(np.int64)
        self.pair_users = torch.from_numpy(pair_users)
        self.pair_items = torch.from_numpy(pair_items)
        # Sorted user*num_items+item keys: O(log P) membership tests for negative sampling.
        self.positive_keys = torch.unique(self.pair_users * data.num_items + self.pair_items)
        self.info.update(dataset=data.name, num_items=data.num_items, num_users=data.num_users,
                         train_pairs=len(pair_items), features=used,
                         block_weights=dict(zip(used, weights)),
                         item_text_fields=self.item_text_fields,
                         user_text_fields=self.user_text_fields,
                         text_encoder=self._encoder().name if "semantic" in used else None,
                         max_users=self.max_users, kcore=self.kcore)
        log.info("tokenizer inputs: items %s, users %s, features %s, %d training pairs",
                 tuple(self.item_x.shape), tuple(self.user_x.shape), used, len(pair_items))

    def _encoder(self) -> TextEncoder:
        if self.text_encoder is None:
            cache = None if self.cache_dir is None else f"{self.cache_dir}/text_embeddings"
            self.text_encoder = TextEncoder(cache_dir=cache)
        return self.text_encoder

    def _semantic(self) -> tuple[Tensor, Tensor]:
        """Text embeddings ``[num_items, E]`` and ``[num_users, E]``."""
        data = self.dataset
        for kind, fields, feats in (("item", self.item_text_fields, data.item_features),
                                    ("user", self.user_text_fields, data.user_features)):
            if fields is None or feats is None:
                continue
            present = sorted({k for f in feats for k in f})
            unknown = [f for f in fields if f not in present]
            if unknown:
                raise DataError(f"{data.name}: data.{kind}_text_fields {unknown} are not "
                                f"{kind} fields of this dataset; it has {present}")
        encoder = self._encoder()
        # One thread, so the embeddings (cached afterwards) do not depend on the thread count.
        with pinned_threads(1):
            items = encoder.encode([data.item_text(i, self.item_text_fields)
                                    for i in range(data.num_items)], desc="item texts")
            users = None
            if data.user_features is not None:
                users = encoder.encode([data.user_text(u, self.user_text_fields)
                                        for u in range(data.num_users)], desc="user profiles")
        if users is None:
            # No profiles: a user reads like the mean of the texts of its training items.
            users = self._mean_item_texts(items, "valid")
        return items, users

    def _mean_item_texts(self, item_text: Tensor, stage: str) -> Tensor:
        """``[num_users, E]``: per user, the mean text vector of the items of the ``stage``
        history (``valid``: training items; ``test``: + the validation item; ``predict``: +
        the test item); zeros for a user without items."""
        split = self.split
        users = torch.zeros(self.dataset.num_users, item_text.shape[1])
        for row, user in enumerate(split.users):
            hist = split.history(row, stage)
            if len(hist):
                users[user] = item_text[torch.as_tensor(hist)].mean(0)
        return users

    def _prefix_mean_item_texts(self, item_text: Tensor) -> Tensor:
        """``[P, E]``: per prefix row, the mean text vector of the prefix's items (what
        :meth:`_mean_item_texts` gives the whole training history)."""
        split = self.split
        rows = [item_text.new_zeros(0, item_text.shape[1])] * self.dataset.num_users
        for row, user in enumerate(split.users):
            items = np.asarray(split.train_items[row], dtype=np.int64)
            if len(items) < 2:
                continue
            sums = item_text[torch.from_numpy(items[:-1])].cumsum(0)
            rows[int(user)] = sums / torch.arange(1, len(items)).unsqueeze(1)
        return torch.cat(rows)

    def tokenizer_inputs(self) -> dict:
        """What :class:`~lightning_modules.dual_tokenizer.DualTokenizer` needs from the data."""
        self.setup()
        return {"item_x": self.item_x, "user_x": self.user_x, "data_info": dict(self.info),
                "user_x_refreshed": dict(self.user_x_refreshed),
                "user_x_prefix": self.user_x_prefix,
                "user_prefix_offsets": self.user_prefix_offsets}

    # -- loaders ----------------------------------------------------------------------------
    def sample_negatives(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, N]`` uniform negatives for ``users`` ``[B]`` and a ``[B, N]`` validity mask
        (False where a sample is still one of the user's training positives after resampling;
        only users who interacted with almost the whole catalogue get any)."""
        num_items = self.dataset.num_items
        negatives = torch.randint(0, num_items, (len(users), self.num_negatives))
        hit = self._is_positive(users[:, None].expand_as(negatives), negatives)
        for _ in range(5):  # resample only the hits (a few percent of the samples)
            rows, cols = torch.nonzero(hit, as_tuple=True)
            if len(rows) == 0:
                break
            fresh = torch.randint(0, num_items, (len(rows),))
            negatives[rows, cols] = fresh
            hit[rows, cols] = self._is_positive(users[rows], fresh)
        return negatives, ~hit

    def _is_positive(self, users: Tensor, items: Tensor) -> Tensor:
        """Elementwise: is ``items`` a training positive of ``users`` (same shapes)?"""
        keys = users * self.dataset.num_items + items
        pos = torch.searchsorted(self.positive_keys, keys).clamp_max(len(self.positive_keys) - 1)
        return self.positive_keys[pos] == keys

    def _collate(self, rows: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        users = self.pair_users[idx]
        negatives, mask = self.sample_negatives(users)
        return {"users": users, "positives": self.pair_items[idx], "negatives": negatives,
                "negative_mask": mask}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(range(len(self.pair_items)), batch_size=self.batch_size, shuffle=True,
                          collate_fn=self._collate, num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        everything = {"items": torch.arange(self.dataset.num_items),
                      "users": torch.arange(self.dataset.num_users)}
        return DataLoader([everything], batch_size=None)
