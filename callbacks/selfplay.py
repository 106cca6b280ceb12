"""Self-play regeneration: the pairs of every dpo epoch come from the current policy.

Before the first epoch (``on_fit_start``) and after every epoch (``on_train_epoch_end``, i.e.
after that epoch's validation), the callback

1. asks the module which preference stage the next epoch belongs to, and opens it when it is
   new (:meth:`PreferenceAligner.begin_stage`: the current policy becomes the reference);
2. samples that epoch's training positions (:meth:`PreferenceDataModule.sample_specs`);
3. runs trie-constrained beam search with the current policy over their prompts (skipped for
   ``random`` negatives), with a progress bar;
4. buckets the candidates into pairs (:meth:`PreferenceDataModule.build_pairs`), computes the
   reference log-probs once for the whole pair set, and hands the pairs to the DataModule.
   When the stage was opened in step 1, the policy that ran the beam search IS the reference,
   so every rejected item that came from a beam takes its beam score (the same sum of
   full-vocabulary log-probabilities, in eval mode); only the chosen items and the others
   (e.g. rated items of the real-feedback stages) are scored again. On the Beauty pipeline
   that scoring pass was about a third of the self-play time.

The Trainer must reload the train dataloader every epoch (``reload_dataloaders_every_n_epochs
= 1``; set here when it is not). Changing the data in ``on_train_epoch_start`` would be too
late: the loader of an epoch is built before that hook.

DDP: prompts are cut into the same fixed batches whatever the world size; rank ``r`` runs
batches ``r, r + W, ...`` and the results are all-gathered (``all_gather_object``), so every
rank holds the same pairs, equal to a single-process run's, and the distributed sampler then
shards them for training.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from callbacks.resume import FitResumeState

log = logging.getLogger(__name__)


def _distributed_map(trainer: L.Trainer | None, num_chunks: int, fn: Callable[[int], object],
                     desc: str = "", progress: bool = True) -> list:
    """``[fn(0), ..., fn(num_chunks - 1)]`` with the chunks spread over the ranks.

    ``fn`` must return CPU objects (they are pickled to the other ranks).
    """
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    mine = list(range(rank, num_chunks, world))
    # A bar only on a terminal: in a log file it is a line of carriage returns per epoch (the
    # callback logs a summary line per generation either way).
    show = progress and rank == 0 and sys.stderr.isatty()
    results = [(c, fn(c)) for c in tqdm(mine, desc=desc, disable=not show, leave=False)]
    if world > 1 and dist.is_available() and dist.is_initialized():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    results.sort(key=lambda cr: cr[0])
    if len(results) != num_chunks:
        raise RuntimeError(f"self-play: gathered {len(results)} of {num_chunks} chunks")
    return [r for _, r in results]


class SelfPlayCallback(FitResumeState):
    """Regenerates the preference pairs of every epoch (see the module docstring).

    Args:
        num_beams: beam width of the candidate generation (the paper goes up to 200; wider
            beams give more medium/hard candidates and cost proportionally more).
        batch_size: prompts per beam-search (and reference-scoring) forward.
        progress_bar: show a tqdm bar for generation and reference scoring (rank 0, on a
            terminal).
    """

    def __init__(self, num_beams: int = 20, batch_size: int = 64,
                 progress_bar: bool = True) -> None:
        super().__init__()
        if num_beams < 1 or batch_size < 1:
            raise ValueError("num_beams and batch_size must be >= 1")
        self.num_beams = num_beams
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.history: list[dict] = []  # per regeneration: epoch, stage, stats, seconds
        self._pairs_epoch: int | None = None  # the epoch the current pairs are for
        self._resume_epoch: int | None = None  # from a checkpoint: regenerate this epoch's

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.reload_dataloaders_every_n_epochs != 1:
            log.info("SelfPlayCallback: reload_dataloaders_every_n_epochs set to 1 (was %d): "
                     "every epoch trains on freshly generated pairs",
                     trainer.reload_dataloaders_every_n_epochs)
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # On resume the loops are restored only after on_fit_start: the epoch to continue
        # with comes from this callback's checkpointed state.
        epoch = self._resume_epoch if self._resume_epoch is not None else trainer.current_epoch
        self._resume_epoch = None
        if pl_module.stage_index_at(epoch) is not None:
            self.regenerate(trainer, pl_module, epoch=epoch)

    def state_dict(self) -> dict:
        return {"pairs_epoch": self._pairs_epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if not self._resuming_fit():  # not the best checkpoint of validate/test
            return
        self.history = list(state.get("history", []))
        self._resume_epoch = state.get("pairs_epoch")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if (max_epochs >= 0 and epoch >= max_epochs) or pl_module.stage_index_at(epoch) is None:
            return
        self.regenerate(trainer, pl_module, epoch)

    # -- work -----------------------------------------------------------------------------------
    def regenerate(self, trainer: L.Trainer | None, pl_module, epoch: int, datamodule=None):
        """Make (and hand over) the pairs of ``epoch``; returns them.

        Usable without a fit (``trainer=None``, pass ``datamodule``) for tests and benchmarks.
        """
        dm = datamodule if datamodule is not None else trainer.datamodule
        index = pl_module.stage_index_at(epoch)
        if index is None:
            raise ValueError(f"epoch {epoch} is past the curriculum ({pl_module.total_epochs} "
                             "epochs)")
        stage = pl_module.schedule[index]
        # True: the policy is the reference until the first optimizer step of this epoch.
        fresh = pl_module.begin_stage(index)
        start = time.perf_counter()
        specs = dm.sample_specs(epoch, stage.negatives)
        candidates = beams = None
        if stage.negatives != "random":
            prompts = dm.prompt_texts(specs)
            exclude = dm.beam_exclusions(specs, stage.negatives)
            candidates, scores = self.generate(trainer, pl_module, prompts, exclude,
                                               desc=f"self-play {stage.name} e{epoch}")
            if fresh:
                beams = (candidates, scores)
        gen_seconds = time.perf_counter() - start
        pairs = dm.build_pairs(specs, stage.negatives, candidates, epoch=epoch)
        pairs.ref_chosen, pairs.ref_rejected = self.reference(
            trainer, pl_module, pairs, desc=f"reference {stage.name} e{epoch}", beams=beams)
        pairs.stats.update({"generation_seconds": round(gen_seconds, 2),
                            "seconds": round(time.perf_counter() - start, 2)})
        dm.set_pairs(pairs)
        self._pairs_epoch = epoch
        self.history.append({"epoch": epoch, "stage": stage.name, **pairs.stats})
        log.info("epoch %d, stage %s: %s", epoch, stage.name,
                 ", ".join(f"{k}={v}" for k, v in pairs.stats.items()))
        return pairs

    def _order(self, prompts: list[str]) -> list[list[int]]:
        """Fixed batches of prompt indices, similar lengths together (less padding)."""
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def generate(self, trainer, pl_module, prompts: list[str], exclude: list[list[int]],
                 desc: str = "self-play") -> tuple[torch.Tensor, torch.Tensor]:
        """``LongTensor [P, W]`` beam candidates of the current policy (``-1`` pad) and their
        ``FloatTensor [P, W]`` summed log-probs (``-inf`` pad)."""
        batches = self._order(prompts)

        def run(c: int):
            idx = batches[c]
            # The policy's own beams and log-probabilities, without a decoding prior.
            items, scores = pl_module.policy.recommend([prompts[i] for i in idx],
                                                       [exclude[i] for i in idx], self.num_beams,
                                                       prior=False)
            return items.cpu(), scores.float().cpu()

        parts = _distributed_map(trainer, len(batches), run, desc, self.progress_bar)
        out = torch.full((len(prompts), self.num_beams), -1, dtype=torch.long)
        out_scores = torch.full((len(prompts), self.num_beams), float("-inf"))
        for idx, (items, scores) in zip(batches, parts):
            rows = torch.as_tensor(idx, dtype=torch.long)
            out[rows, :items.shape[1]] = items
            out_scores[rows, :scores.shape[1]] = scores
        return out, out_scores

    def reference(self, trainer, pl_module, pairs, desc: str = "reference",
                  beams: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``[P]`` of the chosen and ``[P, N]`` of the rejected items.

        ``beams``: ``(candidates [S, W], scores [S, W])`` of the specs ``pairs`` were built
        from, generated by the reference itself; items found there take their beam score and
        only the rest is scored (``pairs.stats["reference_from_beams"]`` counts them).
        """
        if len(pairs) == 0:
            return torch.zeros(0), torch.zeros(pairs.rejected.shape)
        items = torch.cat([pairs.chosen.unsqueeze(1), pairs.rejected], dim=1)   # [P, 1 + N]
        valid = items >= 0
        out = torch.zeros(items.shape, dtype=torch.float32)
        todo = valid
        if beams is not None:
            candidates, scores = (t[pairs.source_index] for t in beams)   # [P, W]
            match = (items.unsqueeze(2) == candidates.unsqueeze(1)) & valid.unsqueeze(2)
            found = match.any(dim=2)   # beam items are unique per prompt: one match at most
            known = torch.where(match, scores.unsqueeze(1), 0.0).sum(2)
            out = torch.where(found, known, out)
            todo = valid & ~found
            pairs.stats["reference_from_beams"] = int(found.sum())
        # The items still to score, left-aligned per row (mostly the chosen item alone).
        order = torch.sort((~todo).to(torch.int8), dim=1, stable=True).indices
        width = max(1, int(todo.sum(1).max()))
        order = order[:, :width]
        todo_items, todo_valid = items.gather(1, order), todo.gather(1, order)
        if bool(todo_valid.any()):
            batches = self._order(pairs.prompts)

            def run(c: int):
                idx = torch.as_tensor(batches[c], dtype=torch.long)
                return pl_module.reference_logps([pairs.prompts[i] for i in batches[c]],
                                                 todo_items[idx], todo_valid[idx])

            parts = _distributed_map(trainer, len(batches), run, desc, self.progress_bar)
            scored = torch.zeros(todo_items.shape, dtype=torch.float32)
            for idx, part in zip(batches, parts):
                scored[torch.as_tensor(idx, dtype=torch.long)] = part
            out = out.scatter(1, order, torch.where(todo_valid, scored, out.gather(1, order)))
        return out[:, 0], out[:, 1:]
