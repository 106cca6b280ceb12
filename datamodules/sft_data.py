"""DataModule of the SFT stage: multi-task alignment examples from the training split only.

Training examples are built from ``split.train_items`` (never the validation or test targets):

* ``seqrec`` in ``sequence`` mode (CPU default): a window of up to ``max_history + 1`` training
  items of one user becomes ONE causal sequence ``prefix item_1 item_2 ...``; the loss covers
  every item after the first ``window_min_context`` ones (the first window of a user trains
  from its second item on). One forward pass trains ~16 next-item predictions instead of one.
  Windows tile the user's sequence from its end with a random shift per draw.
* ``seqrec`` in ``prompt`` mode (the paper's form): one instruction example per prefix.
* ``item2index``, ``index2item``, ``user2index``, ``index2user``, ``fusionseqrec``: alignment
  tasks, ``weight x (natural size)`` examples per epoch (items, users, users). Which
  items/users a task of weight < 1 trains is one seeded draw for the whole fit
  (``task_draws: fixed``) or a new draw every epoch (``task_draws: epoch``), so that over the
  epochs the tasks cover the whole catalogue.
* ``task_schedule``: ``mixed`` trains every task in every epoch; ``align_first`` keeps each
  task's examples over the fit but orders them: all alignment examples of the fit first, then
  the next-item ones, cut into epochs of the same size (so the schedule's steps do not change).

Validation predicts ``split.valid_target`` from ``history(row, "valid")``; test predicts
``split.test_target`` from ``history(row, "test")``. Evaluation batches carry row indices,
targets and the user's seen items (for history exclusion); the model builds the prompts.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import RecDataModule
from lightning_modules.components.artifacts import USER_PREFIX_CODES_FILE, load_tensor
from lightning_modules.components.prompts import (
    TASKS,
    PromptBuilder,
    collate_encoded,
    default_templates_path,
    encode_segments,
    pad_items,
)
from lightning_modules.components.scid_map import SCIDMap, load_scid_map

log = logging.getLogger(__name__)

TASK_DRAWS = ("fixed", "epoch")
TASK_SCHEDULES = ("mixed", "align_first")
NEXT_ITEM_TASKS = ("seqrec",)
DEFAULT_TASKS = {"seqrec": 1.0, "item2index": 0.5, "index2item": 0.25, "user2index": 0.5,
                 "index2user": 0.25, "fusionseqrec": 0.1}


class SFTTrainDataset(Dataset):
    """Specs ``(task, index)`` of one epoch; the text is drawn in ``__getitem__``.

    ``__getitem__`` returns ``(segments, add_eos)`` (see
    :mod:`lightning_modules.components.prompts`).
    """

    def __init__(self, prompts: PromptBuilder, split, tasks: dict[str, float],
                 seqrec_mode: str, window_min_context: int, max_history: int,
                 seed: int | list[int] = 0) -> None:
        self.prompts = prompts
        self.split = split
        self.max_history = max_history
        self.window = max_history + 1
        self.min_ctx = max(0, min(window_min_context, max_history))
        self.stride = self.window - self.min_ctx
        self.seqrec_mode = seqrec_mode
        users = split.users
        self.train_items = split.train_items
        # Natural sizes of the tasks (weight 1.0 = one pass over them).
        if seqrec_mode == "sequence":
            seq_specs = [(r, k) for r, s in enumerate(self.train_items)
                         for k in range(self._num_windows(len(s)))]
        else:
            seq_specs = [(r, j) for r, s in enumerate(self.train_items) for j in range(1, len(s))]
        rows_with_targets = [r for r, s in enumerate(self.train_items) if len(s) >= 2]
        natural = {
            "seqrec": seq_specs,
            "item2index": list(range(split.num_items)),
            "index2item": list(range(split.num_items)),
            "user2index": [int(u) for u in users],
            "index2user": [int(u) for u in users],
            "fusionseqrec": rows_with_targets,
        }
        rng = np.random.default_rng(seed)
        self.specs: list[tuple[str, object]] = []
        self.counts: dict[str, int] = {}
        for task, weight in tasks.items():
            if task not in TASKS:
                raise ValueError(f"unknown SFT task {task!r}; known: {TASKS}")
            if weight <= 0:
                continue
            missing = prompts.missing_for(task)
            if missing is not None:
                log.warning("task %s skipped: it needs %s", task, missing)
                continue
            pool = natural[task]
            n = int(round(weight * len(pool)))
            if n == 0 or not pool:
                continue
            idx = np.concatenate([rng.permutation(len(pool))
                                  for _ in range(math.ceil(n / len(pool)))])[:n]
            self.specs += [(task, pool[i]) for i in idx]
            self.counts[task] = n

    def _num_windows(self, n: int) -> int:
        # Targets are positions 1..n-1; each window trains `stride` of them.
        return max(0, math.ceil((n - 1) / self.stride))

    def __len__(self) -> int:
        return len(self.specs)

    def _window(self, row: int, k: int) -> tuple[list[int], int, int]:
        """Items of window ``k`` of ``row`` (from the end), the first trained position in the
        window and the window's start in the row's training items."""
        seq = self.train_items[row]
        n = len(seq)
        # The most recent items (k = 0) always train: they are closest to the held-out targets.
        shift = random.randrange(self.stride) if k else 0
        end = max(1, n - 1 - k * self.stride - shift)  # index of the last item in the window
        start = max(0, end + 1 - self.window)
        items = seq[start:end + 1]
        first = 1 if start == 0 else self.min_ctx
        return [int(i) for i in items], first, start

    def __getitem__(self, i: int):
        task, spec = self.specs[i]
        p = self.prompts
        users = self.split.users
        if task == "seqrec":
            row, k = spec
            user = int(users[row])
            if self.seqrec_mode == "sequence":
                items, first, start = self._window(row, k)
                return p.sequence_segments(user, items, first, prefix=start + first), False
            seq = self.train_items[row]
            hist = seq[max(0, k - self.max_history):k]
            return p.seqrec(user, hist, int(seq[k]), prefix=k), False
        if task == "item2index":
            return p.item2index(spec), False
        if task == "index2item":
            return p.index2item(spec), True
        if task == "user2index":
            return p.user2index(spec), False
        if task == "index2user":
            return p.index2user(spec), True
        if task == "fusionseqrec":
            row = spec
            seq = self.train_items[row]
            j = random.randrange(1, len(seq))
            hist = seq[max(0, j - self.max_history):j]
            segs = p.fusionseqrec(int(users[row]), hist, int(seq[j]), prefix=j)
            return segs, not segs[-1][0].startswith("<")
        raise AssertionError(task)


class LengthGroupedSampler(Sampler[int]):
    """Random order in which neighbours have similar lengths (less padding per batch).

    Every epoch: a seeded permutation, cut into groups of ``batch_size * group_batches``
    examples; each group sorted by length (longest first) and cut into batches; the batches
    of all groups shuffled. The DataLoader's consecutive ``batch_size`` indices are then one
    such batch. Under DDP, Lightning's wrapper deals the indices out round-robin, so each
    rank's batches are drawn from the same sorted neighbourhoods.

    The epoch comes from :meth:`set_epoch` when Lightning calls it, else from a counter of
    completed passes; both start from ``seed``, so the order is reproducible.
    """

    def __init__(self, lengths: list[int], batch_size: int, group_batches: int = 50,
                 seed: int = 0) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError("batch_size and group_batches must be >= 1")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.group = batch_size * group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        batches = []
        for s in range(0, len(perm), self.group):
            chunk = perm[s:s + self.group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size]
                        for i in range(0, len(chunk), self.batch_size)]
        # Full batches in random order; a group's short remainder stays a batch of its own.
        return [int(i) for b in rng.permutation(len(batches)) for i in batches[b]]

    def __iter__(self):
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)


class TrainCollator:
    """Tokenizes a batch of segment lists; dynamic (per-batch) right padding."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch):
        rows = encode_segments(self.tokenizer, [b[0] for b in batch], [b[1] for b in batch],
                               max_length=self.max_length)
        return collate_encoded(rows, self.tokenizer.pad_token_id)


class EvalDataset(Dataset):
    """One row per kept user: ``(row, target, seen items)`` of the ``stage`` split."""

    def __init__(self, split, stage: str, rows: np.ndarray) -> None:
        self.split = split
        self.stage = stage
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        s = self.split
        seen = s.seen_items(row, self.stage)
        target = -1 if self.stage == "predict" else int(s.target(self.stage)[row])
        return row, target, seen


def eval_collate(batch) -> dict[str, torch.Tensor]:
    """``rows`` ``[B]``, ``target`` ``[B]``, ``exclude`` ``[B, H]`` (seen items, -1 padded)."""
    return {"rows": torch.tensor([b[0] for b in batch], dtype=torch.long),
            "target": torch.tensor([b[1] for b in batch], dtype=torch.long),
            "exclude": pad_items([b[2] for b in batch])}


class SFTDataModule(RecDataModule):
    """Multi-task SFT data (see the module docstring); base arguments as in ``RecDataModule``.

    Args:
        scid_dir: folder of ``scid_map.json`` (default ``<run_dir>/tokenizer``); ablations
            point it at another tokenizer run.
        templates: prompt templates YAML (default ``configs/templates/<dataset>_prompts.yaml``).
        tasks: task -> weight (examples per epoch = weight x natural size; 0 drops the task).
        seqrec_mode: ``sequence`` (one causal pass per history window) or ``prompt``.
        window_min_context: items at the start of a window that only serve as context.
        inject_user: put the user SCID into the prompts (when the map has user codes).
        fusion_history: history titles shown in fusionseqrec prompts.
        max_length: longest training row in tokens (longer rows keep their end).
        val_max_users: during fit, validate (for model selection and the curves) on a seeded
            random sample of N users, the same every epoch; ``validate`` (what the pipeline
            reports) and test always use every user. ``None``: every user throughout.
        group_by_length: batch examples of similar token length together (random groups of
            ``50 x batch_size`` sorted by length). On ML-100K it removes 12% of the padded
            cells, but batches of one kind of task trained worse (README "Speed").
        user_scid_causal: training prompts of next-item examples (seqrec, fusionseqrec) show
            the user SCID encoded from the user's state before the first target they train
            (the tokenizer's ``user_prefix_codes.pt``), not the one encoded after all training
            items, which knows the targets. Evaluation prompts and the user alignment tasks
            keep the training-history SCID.
        task_draws: ``fixed``: a task of weight ``w < 1`` trains the same seeded ``w`` share
            of its items/users every epoch (the others never); ``epoch``: a new seeded draw
            every epoch (needs ``trainer.reload_dataloaders_every_n_epochs: 1``), the same
            number of examples per epoch, so the schedule's steps do not change.
        task_schedule: ``mixed``: every epoch trains all tasks; ``align_first``: the fit's
            examples are the same (epoch ``e`` of ``trainer.max_epochs`` contributes its draw),
            but the alignment tasks' examples come first and the next-item (``seqrec``) ones
            after them, cut into epochs of equal size: the first epochs align SCIDs with text,
            the last ones only predict the next item. Needs
            ``trainer.reload_dataloaders_every_n_epochs: 1``.
    """

    reads_stages = ("tokenizer",)  # the SCID map

    def __init__(self, *args, scid_dir: str | None = None, templates: str | None = None,
                 tasks: dict[str, float] | None = None, seqrec_mode: str = "sequence",
                 window_min_context: int = 5, inject_user: bool = True,
                 fusion_history: int = 5, max_length: int = 256,
                 val_max_users: int | None = None, group_by_length: bool = False,
                 user_scid_causal: bool = False, task_draws: str = "fixed",
                 task_schedule: str = "mixed", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if val_max_users is not None and val_max_users < 1:
            raise ValueError(f"data.val_max_users must be >= 1 or null, got {val_max_users}")
        if task_draws not in TASK_DRAWS:
            raise ValueError(f"data.task_draws must be one of {TASK_DRAWS}, got {task_draws!r}")
        if task_schedule not in TASK_SCHEDULES:
            raise ValueError(f"data.task_schedule must be one of {TASK_SCHEDULES}, "
                             f"got {task_schedule!r}")
        self.task_draws = task_draws
        self.task_schedule = task_schedule
        self.group_by_length = group_by_length
        self.scid_dir = scid_dir
        self.templates = templates
        self.tasks = dict(DEFAULT_TASKS if tasks is None else tasks)
        self.seqrec_mode = seqrec_mode
        self.window_min_context = window_min_context
        self.inject_user = inject_user
        self.fusion_history = fusion_history
        self.max_length = max_length
        self.val_max_users = val_max_users
        self.user_scid_causal = bool(user_scid_causal)
        self.scid_map: SCIDMap | None = None
        self.prompts: PromptBuilder | None = None
        self.tokenizer = None

    def scid_path(self) -> Path:
        if self.scid_dir:
            return Path(self.scid_dir)
        if self.run_dir:
            return Path(self.run_dir) / "tokenizer"
        raise ValueError("SFTDataModule needs run_dir (with tokenizer/scid_map.json) or scid_dir")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.prompts is None:
            self.scid_map = load_scid_map(self.scid_path())
            templates = self.templates or default_templates_path(self.dataset.name)
            log.info("%s: prompt templates %s", self.dataset.name, templates)
            self.prompts = PromptBuilder(
                self.dataset, self.scid_map, templates, inject_user=self.inject_user,
                max_history=self.max_history, fusion_history=self.fusion_history,
                seqrec_mode=self.seqrec_mode)
            if self.user_scid_causal and self.prompts.inject_user:
                self.prompts.use_prefix_user_codes(*self._prefix_user_codes())

    def _prefix_user_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.scid_path() / USER_PREFIX_CODES_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: data.init_args.user_scid_causal=true needs the tokenizer stage's "
                "user codes before every training target; rerun the sasrec and tokenizer "
                "stages with this version to export them")
        blob = load_tensor(path, "tokenizer", "user prefix codes (codes and offsets)")
        codes = blob.get("codes") if isinstance(blob, dict) else None
        offsets = blob.get("offsets") if isinstance(blob, dict) else None
        if not isinstance(codes, torch.Tensor) or not isinstance(offsets, torch.Tensor):
            raise ValueError(f"{path}: expected {{'codes': [P, L], 'offsets': [U + 1]}}")
        # Only the users of this split are checked: a slice (max_users) of the tokenized data
        # uses the first users' codes.
        users = torch.as_tensor(self.split.users, dtype=torch.long)
        if len(users) and int(users.max()) >= len(offsets) - 1:
            raise ValueError(f"{path}: offsets for {len(offsets) - 1} users, but this split "
                             f"has user {int(users.max())}: the codes belong to other data")
        got = offsets.long().diff()[users]
        expected = torch.from_numpy(self.split.prefix_offsets(len(offsets) - 1)).diff()[users]
        if not torch.equal(got, expected):
            i = int(torch.nonzero(got != expected)[0])
            raise ValueError(f"{path}: user {int(users[i])} has {int(got[i])} prefix codes, "
                             f"but this split gives it {int(expected[i])} training prefixes: "
                             "the codes belong to other data")
        return codes, offsets

    def attach_tokenizer(self, tokenizer) -> None:
        """The model hands over its tokenizer (it owns it; the collator needs it)."""
        self.tokenizer = tokenizer

    def train_dataset(self, epoch: int | None = None,
                      num_epochs: int | None = None) -> SFTTrainDataset:
        """The examples of one epoch (default: the trainer's current epoch).

        With ``task_draws: epoch`` the draw of ``epoch``, otherwise the one seeded draw; with
        ``task_schedule: align_first`` epoch ``epoch``'s share of the fit's examples, alignment
        first (``num_epochs`` defaults to ``trainer.max_epochs``).
        """
        self.setup()
        trainer = self.trainer
        per_epoch = self.task_draws == "epoch" or self.task_schedule == "align_first"
        if epoch is None:
            epoch = int(trainer.current_epoch) if trainer is not None else 0
        if per_epoch and trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            option = ("task_draws=epoch draws new alignment examples every epoch"
                      if self.task_draws == "epoch" else
                      "task_schedule=align_first trains other tasks in other epochs")
            raise ValueError(
                f"data.init_args.{option}, so the trainer must rebuild the train dataloader "
                "every epoch: set trainer.reload_dataloaders_every_n_epochs: 1 (it is "
                f"{trainer.reload_dataloaders_every_n_epochs})")
        if self.task_schedule == "align_first":
            if num_epochs is None:
                num_epochs = trainer.max_epochs if trainer is not None else None
            if num_epochs is None or num_epochs < 1:
                raise ValueError("data.init_args.task_schedule=align_first spreads the fit's "
                                 "examples over its epochs: set trainer.max_epochs "
                                 f"(got {num_epochs})")
            ds = self._scheduled(int(epoch), int(num_epochs))
        else:
            ds = self._drawn(int(epoch))
        log.info("SFT examples of epoch %d: %s", epoch, ds.counts)
        return ds

    def _drawn(self, epoch: int) -> SFTTrainDataset:
        seed: int | list[int] = [self.seed, epoch] if self.task_draws == "epoch" else self.seed
        return SFTTrainDataset(self.prompts, self.split, self.tasks, self.seqrec_mode,
                               self.window_min_context, self.max_history, seed=seed)

    def _scheduled(self, epoch: int, num_epochs: int) -> SFTTrainDataset:
        """Epoch ``epoch`` of ``num_epochs`` under ``align_first``: the draws of all epochs,
        alignment examples before next-item ones (each in epoch order), cut evenly."""
        if not 0 <= epoch < num_epochs:
            raise ValueError(f"epoch {epoch} is outside the fit's {num_epochs} epochs")
        per_epoch = self.task_draws == "epoch"
        draws = [self._drawn(e) for e in range(num_epochs)] if per_epoch else [self._drawn(0)]
        fit = [s for d in draws for s in d.specs] * (1 if per_epoch else num_epochs)
        order = sorted(fit, key=lambda spec: spec[0] in NEXT_ITEM_TASKS)  # stable: alignment first
        ds = draws[epoch if per_epoch else 0]
        lo, hi = (epoch * len(order)) // num_epochs, ((epoch + 1) * len(order)) // num_epochs
        ds.specs = order[lo:hi]
        ds.counts = dict(Counter(task for task, _ in ds.specs))
        return ds

    def train_dataloader(self) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached: the GenerativeRecommender attaches it in "
                               "configure_model(); call dm.attach_tokenizer(tok) when used alone")
        ds = self.train_dataset()
        collate = TrainCollator(self.tokenizer, self.max_length)
        if not self.group_by_length:
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=self.num_workers, drop_last=False)
        sampler = LengthGroupedSampler(self.example_lengths(ds), self.batch_size,
                                       seed=self.seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, drop_last=False)

    def example_lengths(self, ds: SFTTrainDataset) -> list[int]:
        """Token length of every example of ``ds`` (one draw of its random parts; later draws
        differ in a user's oldest, shorter window and in the paraphrase picked)."""
        state = random.getstate()
        random.seed(self.seed)  # the draws here leave the training stream untouched
        try:
            examples = [ds[i] for i in range(len(ds))]
        finally:
            random.setstate(state)
        rows = encode_segments(self.tokenizer, [e[0] for e in examples],
                               [e[1] for e in examples], max_length=self.max_length)
        return [len(ids) for ids, _ in rows]

    def _eval(self, stage: str, rows: np.ndarray | None = None) -> DataLoader:
        self.setup()
        if rows is None:
            rows = np.arange(len(self.split.users))
        if stage != "predict":
            rows = self.by_prompt_length(rows, stage)
        return self.eval_loader(EvalDataset(self.split, stage, rows), collate_fn=eval_collate)

    def by_prompt_length(self, rows: np.ndarray, stage: str) -> np.ndarray:
        """``rows`` ordered by the length of their ``stage`` history in the prompt, longest
        first (stable), so that a beam-search batch holds prompts of similar length and its
        left padding stays short (as the self-play callback orders its prompts). Metrics and
        the exported ranks do not depend on the order (ranks are sorted by row)."""
        hist = np.array([min(len(self.split.history(int(r), stage)), self.max_history)
                         for r in rows], dtype=np.int64)
        return np.asarray(rows)[np.argsort(-hist, kind="stable")]

    def fit_validation_rows(self) -> np.ndarray | None:
        """Split rows validated during fit: a seeded sample of ``val_max_users`` (sorted), or
        ``None`` for every user."""
        self.setup()
        n = len(self.split.users)
        if self.val_max_users is None or self.val_max_users >= n:
            return None
        rng = np.random.default_rng([self.seed, 7])
        return np.sort(rng.choice(n, size=self.val_max_users, replace=False))

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        fitting = trainer is not None and getattr(trainer.state.fn, "value", None) == "fit"
        return self._eval("valid", self.fit_validation_rows() if fitting else None)

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval("predict")
