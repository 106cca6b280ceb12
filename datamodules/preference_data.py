"""Preference pairs of the dpo stage, built from the training split only.

A pair is ``(prompt, chosen, rejected_1..N)``:

* prompt: the seqrec prompt of a *training* position ``t`` of a user (history =
  ``train_items[:t]``, the most recent ``max_history`` of them);
* chosen: the true next item ``train_items[t]``;
* rejected, by the kind of negatives a preference stage asks for:

  ===========  ==============================================================================
  ``easy``     policy beam candidates sharing 0 code positions with the chosen item
  ``medium``   ... sharing exactly 1 position
  ``hard``     ... sharing 2 or more positions
  ``beam``     all beam candidates, best first (self-play without a curriculum)
  ``random``   uniform random items (static DPO baseline; no policy involved)
  ``dislike``  real feedback: the user's training items rated ``<= dislike_threshold``
               (optionally also beam candidates the user never engaged with); the chosen
               item must be liked (rating ``>= like_threshold``)
  ``neutral``  real feedback: the user's training items rated strictly between the thresholds
  ===========  ==============================================================================

Negatives are never items the user interacted with in the training split, except the rated
training items that *are* the real-feedback negatives: a user's own positives are false
negatives. Pairs are built from training-split information only: the validation and test
targets are unknown here, so they neither shape the beam exclusions nor are filtered out of the
negatives (filtering them would leak the held-out labels into training; the test
``test_pairs_do_not_depend_on_held_out_targets`` checks it). Negatives from beams keep the
policy's order (the items the policy likes most are the most informative); rated negatives the
beams did not reach follow, most recent first.

The pairs of an epoch are computed by :class:`callbacks.selfplay.SelfPlayCallback` (it runs
the policy) and handed over with :meth:`PreferenceDataModule.set_pairs`; with
``reload_dataloaders_every_n_epochs=1`` each epoch trains on the pairs made for it.
Validation and test loaders are the SFT stage's (same protocol, same evaluator).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.sft_data import SFTDataModule
from lightning_modules.components.selfplay import (
    BUCKETS,
    FEEDBACK_KINDS,
    NEGATIVE_KINDS,
    bucket_candidates,
    pad_negatives,
)

log = logging.getLogger(__name__)



@dataclass
class PromptSpec:
    """One training position: split row ``row``, chosen item ``train_items[row][position]``."""

    row: int
    position: int
    user: int
    chosen: int


@dataclass
class PreferencePairs:
    """The pairs of one epoch (``P`` prompts, up to ``N`` negatives each).

    Attributes:
        kind: the negative kind they were built for (see the module docstring).
        specs: the ``P`` training positions.
        prompts: ``P`` prompt strings.
        chosen: ``LongTensor [P]`` chosen item ids.
        rejected: ``LongTensor [P, N]`` rejected item ids, ``-1`` = padding (left-aligned).
        ref_chosen, ref_rejected: reference log-probs ``[P]`` / ``[P, N]`` (set by the module).
        source_index: ``LongTensor [P]``, each pair's position among the specs handed to
            :meth:`PreferenceDataModule.build_pairs` (specs without a negative are dropped).
        stats: counts for logging (prompts, pairs, negatives, bucket sizes).
    """

    kind: str
    specs: list[PromptSpec]
    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    source_index: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def rejected_mask(self) -> torch.Tensor:
        return self.rejected >= 0

    def as_records(self) -> list[tuple[int, int, list[int]]]:
        """``(user, chosen, rejected...)`` per pair (for tests and comparisons)."""
        return [(s.user, int(c), [int(r) for r in rej if r >= 0])
                for s, c, rej in zip(self.specs, self.chosen, self.rejected)]


class PairDataset(Dataset):
    """Index ``i`` -> one pair as a dict of its prompt, items and reference log-probs."""

    def __init__(self, pairs: PreferencePairs) -> None:
        if pairs.ref_chosen is None or pairs.ref_rejected is None:
            raise ValueError("pairs need reference log-probs before training "
                             "(PreferenceAligner.reference_logps)")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs
        return {"prompt": p.prompts[i], "chosen": p.chosen[i], "rejected": p.rejected[i],
                "ref_chosen": p.ref_chosen[i], "ref_rejected": p.ref_rejected[i]}


def collate_pairs(batch: list[dict]) -> dict:
    """``prompts`` list[B]; ``chosen`` [B]; ``rejected``, ``rejected_mask``, ``ref_rejected``
    [B, n]; ``ref_chosen`` [B]. ``n`` is the batch's largest real negative count (negatives are
    left-aligned), so padding beyond it costs no forward passes."""
    rejected = torch.stack([b["rejected"] for b in batch])
    mask = rejected >= 0
    n = max(1, int(mask.sum(dim=1).max()))
    return {"prompts": [b["prompt"] for b in batch],
            "chosen": torch.stack([b["chosen"] for b in batch]),
            "rejected": rejected[:, :n], "rejected_mask": mask[:, :n],
            "ref_chosen": torch.stack([b["ref_chosen"] for b in batch]),
            "ref_rejected": torch.stack([b["ref_rejected"] for b in batch])[:, :n]}


class PreferenceDataModule(SFTDataModule):
    """Preference pairs for the dpo stage (see the module docstring); evaluation as in SFT.

    Base arguments as in :class:`SFTDataModule` (``seqrec_mode``, ``inject_user`` and the
    templates must match the SFT run that trained the policy: they make the prompt).

    Args:
        like_threshold: ratings ``>=`` this are "liked" (real-feedback chosen items).
        dislike_threshold: ratings ``<=`` this are "disliked"; ratings strictly between the
            thresholds are "neutral".
        dislike_never_engaged: also use beam candidates the user never engaged with as
            disliked negatives (the paper's "or never engaged").
        prompts_per_user: training positions sampled per user per epoch (self-play generation
            is the expensive part; one per user gives ``num_users`` prompts an epoch).
        max_prompts: cap on prompts per epoch (``None``: no cap).
        min_history: the earliest training position used (items of history before it).
        recent_positions: sample only among each user's last ``recent_positions`` training
            positions (closest in time to the held-out targets); ``None`` = all positions.
        num_negatives: ``N``, rejected items per pair (paper: 20).
        bucket_levels: code levels compared when bucketing self-play candidates (the first
            ``bucket_levels``); ``None`` = every semantic level: all levels, except a
            de-duplication level the tokenizer appended (its codes carry no meaning, and
            nearly every item shares code 0 there).
    """

    def __init__(self, *args, like_threshold: float = 4.0, dislike_threshold: float = 2.0,
                 dislike_never_engaged: bool = False, prompts_per_user: int = 1,
                 max_prompts: int | None = None, min_history: int = 1,
                 recent_positions: int | None = None,
                 num_negatives: int = 20, bucket_levels: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if dislike_threshold >= like_threshold:
            raise ValueError(f"dislike_threshold ({dislike_threshold}) must be below "
                             f"like_threshold ({like_threshold})")
        if num_negatives < 1 or prompts_per_user < 1 or min_history < 0:
            raise ValueError("num_negatives and prompts_per_user must be >= 1, "
                             "min_history >= 0")
        self.like_threshold = float(like_threshold)
        self.dislike_threshold = float(dislike_threshold)
        self.dislike_never_engaged = dislike_never_engaged
        self.prompts_per_user = prompts_per_user
        self.max_prompts = max_prompts
        self.min_history = min_history
        self.recent_positions = recent_positions
        self.num_negatives = num_negatives
        self.bucket_levels = bucket_levels
        self.pairs: PreferencePairs | None = None
        self._interacted: list[set[int]] | None = None

    # -- what the data supports ---------------------------------------------------------------
    @property
    def has_feedback(self) -> bool:
        """Whether real-feedback (rating) stages can run on this dataset."""
        self.load()
        return self.split.train_ratings is not None

    def interacted(self, row: int) -> set[int]:
        """The row's training items (never a negative). Held-out targets are not included:
        knowing them would let the held-out labels shape the training pairs."""
        if self._interacted is None:
            s = self.split
            self._interacted = [set(map(int, s.train_items[r])) for r in range(len(s.users))]
        return self._interacted[row]

    def feedback_items(self, row: int, kind: str) -> list[int]:
        """The row's training items whose rating makes them ``kind`` negatives, most recent
        first (``dislike``: ``<= dislike_threshold``; ``neutral``: strictly between)."""
        items = self.split.train_items[row]
        ratings = self.split.train_ratings[row]
        if kind == "dislike":
            keep = ratings <= self.dislike_threshold
        elif kind == "neutral":
            keep = (ratings > self.dislike_threshold) & (ratings < self.like_threshold)
        else:
            raise ValueError(f"not a feedback kind: {kind!r}")
        out, seen = [], set()
        for item in items[keep][::-1].tolist():
            if item not in seen:
                seen.add(item)
                out.append(int(item))
        return out

    def compared_levels(self) -> int:
        """Code levels the difficulty buckets compare (see ``bucket_levels``)."""
        self.setup()
        levels = self.scid_map.item_levels
        if self.bucket_levels is not None:
            return max(1, min(int(self.bucket_levels), levels))
        stats = (self.scid_map.meta or {}).get("statistics", {}).get("items", {})
        return levels - 1 if stats.get("appended_level") and levels > 1 else levels

    # -- prompts ------------------------------------------------------------------------------
    def sample_specs(self, epoch: int, kind: str) -> list[PromptSpec]:
        """Training positions of one epoch (deterministic in ``seed`` and ``epoch``, so every
        DDP rank draws the same). Real-feedback kinds only take positions whose item is liked
        and whose user has negatives of that kind."""
        self.setup()
        split = self.split
        rng = np.random.default_rng([self.seed, epoch])
        specs: list[PromptSpec] = []
        for row, items in enumerate(split.train_items):
            positions = np.arange(self.min_history, len(items))
            if self.recent_positions is not None:
                positions = positions[-self.recent_positions:]
            if kind in FEEDBACK_KINDS:
                ratings = split.train_ratings[row]
                positions = positions[ratings[positions] >= self.like_threshold]
                if len(positions) and not self.feedback_items(row, kind) and \
                        not (kind == "dislike" and self.dislike_never_engaged):
                    positions = positions[:0]
            if not len(positions):
                continue
            k = min(self.prompts_per_user, len(positions))
            for t in sorted(rng.choice(positions, size=k, replace=False).tolist()):
                specs.append(PromptSpec(row=row, position=int(t), user=int(split.users[row]),
                                        chosen=int(items[t])))
        if self.max_prompts is not None and len(specs) > self.max_prompts:
            pick = np.sort(rng.choice(len(specs), size=self.max_prompts, replace=False))
            specs = [specs[i] for i in pick]
        return specs

    def history(self, spec: PromptSpec) -> np.ndarray:
        """The prompt's history: training items before the position (most recent
        ``max_history``)."""
        items = self.split.train_items[spec.row]
        return items[max(0, spec.position - self.max_history):spec.position]

    def prompt_texts(self, specs: list[PromptSpec]) -> list[str]:
        """The seqrec prompts (evaluation template) of the training positions (with
        ``user_scid_causal``, each shows the user SCID of the state before its position)."""
        self.setup()
        return [self.prompts.seqrec_prompt(s.user, self.history(s), prefix=s.position or None)
                for s in specs]

    def beam_exclusions(self, specs: list[PromptSpec], kind: str) -> list[list[int]]:
        """Items the policy's beam search must skip: every interacted item, except the rated
        items a feedback kind wants ranked (they may become negatives)."""
        out = []
        for s in specs:
            banned = self.interacted(s.row)
            if kind in FEEDBACK_KINDS:
                banned = banned - set(self.feedback_items(s.row, kind))
                banned.add(s.chosen)
            out.append(sorted(banned))
        return out

    # -- pairs --------------------------------------------------------------------------------
    def build_pairs(self, specs: list[PromptSpec], kind: str,
                    candidates: torch.Tensor | None = None, epoch: int = 0) -> PreferencePairs:
        """Pairs of ``kind`` for ``specs``.

        Args:
            specs: training positions (:meth:`sample_specs`).
            kind: one of :data:`NEGATIVE_KINDS`.
            candidates: ``LongTensor [P, W]`` the policy's beam items per spec (``-1`` pad);
                needed by every kind except ``random``.
            epoch: seeds the ``random`` kind.
        Returns:
            :class:`PreferencePairs` without reference log-probs; specs without any negative
            are dropped.
        """
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"unknown negative kind {kind!r}; known: {NEGATIVE_KINDS}")
        self.setup()
        n = self.num_negatives
        forbidden = [self.interacted(s.row) for s in specs]
        chosen = torch.tensor([s.chosen for s in specs], dtype=torch.long)
        stats: dict = {"prompts": len(specs)}
        if kind == "random":
            negatives = self._random_negatives(forbidden, epoch)
        else:
            if candidates is None or candidates.shape[0] != len(specs):
                raise ValueError(f"kind {kind!r} needs beam candidates [P, W] for {len(specs)} "
                                 "prompts")
            if kind in FEEDBACK_KINDS:
                negatives = self._feedback_negatives(specs, kind, candidates, forbidden)
            else:
                codes = self.scid_map.item_codes[:, :self.compared_levels()]
                buckets = bucket_candidates(candidates, chosen, codes, forbidden)
                for name in BUCKETS:
                    stats[f"candidates_{name}"] = int(sum(len(r) for r in buckets[name]))
                if kind == "beam":
                    # every bucket together, back in beam order
                    negatives = []
                    for b, row in enumerate(candidates.tolist()):
                        allowed = {i for name in BUCKETS for i in buckets[name][b]}
                        negatives.append(list(dict.fromkeys(i for i in row if i in allowed)))
                else:
                    negatives = buckets[kind]
        keep = [i for i, neg in enumerate(negatives) if neg]
        specs = [specs[i] for i in keep]
        rejected, mask = pad_negatives([negatives[i] for i in keep], n)
        stats.update({"pairs": len(specs), "negatives": int(mask.sum()),
                      "negatives_per_pair": float(mask.sum(dim=1).float().mean())
                      if len(specs) else 0.0})
        return PreferencePairs(kind=kind, specs=specs, prompts=self.prompt_texts(specs),
                               chosen=chosen[keep], rejected=rejected, stats=stats,
                               source_index=torch.tensor(keep, dtype=torch.long))

    def _random_negatives(self, forbidden: list[set[int]], epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, 7])
        num_items = self.split.num_items
        out = []
        for banned in forbidden:
            picks: list[int] = []
            # Rejection sampling: users interact with a small share of the catalogue.
            while len(picks) < self.num_negatives and len(banned) + len(picks) < num_items:
                for i in rng.integers(num_items, size=2 * self.num_negatives).tolist():
                    if i not in banned and i not in picks:
                        picks.append(int(i))
                        if len(picks) == self.num_negatives:
                            break
            out.append(picks)
        return out

    def _feedback_negatives(self, specs: list[PromptSpec], kind: str, candidates: torch.Tensor,
                            forbidden: list[set[int]]) -> list[list[int]]:
        out = []
        for spec, row, banned in zip(specs, candidates.tolist(), forbidden):
            rated = self.feedback_items(spec.row, kind)
            pool = set(rated)
            never = kind == "dislike" and self.dislike_never_engaged
            ranked = [i for i in row if i >= 0 and i != spec.chosen and
                      (i in pool or (never and i not in banned))]
            negatives = list(dict.fromkeys(ranked))
            negatives += [i for i in rated if i not in negatives and i != spec.chosen]
            out.append(negatives)
        return out

    # -- loaders ------------------------------------------------------------------------------
    def set_pairs(self, pairs: PreferencePairs) -> None:
        """Pairs (with reference log-probs) for the next training epoch."""
        self.pairs = pairs

    def train_dataloader(self) -> DataLoader:
        if self.pairs is None:
            raise RuntimeError("no preference pairs yet: the SelfPlayCallback makes them before "
                               "each epoch (PreferenceAligner adds it when it is missing)")
        if len(self.pairs) == 0:
            log.warning("the %r pairs of this epoch are empty: no prompt had a negative of that "
                        "kind (raise the beam width or prompts_per_user); the epoch is skipped",
                        self.pairs.kind)
        # An empty epoch trains nothing (a shuffling sampler would refuse zero samples).
        return DataLoader(PairDataset(self.pairs), batch_size=self.batch_size,
                          shuffle=len(self.pairs) > 0, collate_fn=collate_pairs,
                          num_workers=self.num_workers)
