"""The dpo stage: progressive softmax-DPO of the SFT policy (Align3GR preference level).

The policy starts from the SFT stage's export (``<run_dir>/sft/hf``) and goes through a
curriculum of preference stages, each a few epochs with its own learning rate::

    sp_easy -> sp_medium -> sp_hard -> rf_dislike -> rf_neutral

Self-play stages (``sp_*``) reject the policy's own beam candidates of growing difficulty;
real-feedback stages (``rf_*``) reject items the user rated low (see
:mod:`datamodules.preference_data`). Every stage starts from the policy the previous stage
left, and that policy is the stage's frozen reference.

How it runs: ONE ``Trainer.fit``; the stage of an epoch follows from the cumulative epochs of
``stages``. :class:`callbacks.selfplay.SelfPlayCallback` makes the pairs of every epoch with
the current policy (before the first epoch and after each one) and calls :meth:`begin_stage`
when an epoch opens a new stage. At a stage start the module snapshots the trainable weights
as the reference, resets the optimizer state, and from then on sets the learning rate of the
stage (linear warm-up, cosine decay within the stage) before every step. Validation after
each epoch uses the shared :class:`RankingEvaluator`; the last validation of a stage is its
per-stage result.

Reference model, memory: no second model is kept. The reference is a copy of the *trainable*
tensors only (all weights for full fine-tuning of a small model; LoRA adapters plus the
SCID embedding rows / LM head for a peft policy), taken at the stage start. Reference
log-probs are computed once per regenerated pair set, under ``no_grad``, by swapping those
tensors into the policy (``param.data`` swap, no extra copy), and travel with the pairs, so
the training step runs the policy only.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightning_modules.components.artifacts import atomic_write_json
from lightning_modules.components.decoding import (
    attn_implementation,
    forward_params,
    mask_for_attention,
)
from lightning_modules.components.dpo_losses import SoftmaxDPOLoss, reward_statistics
from lightning_modules.components.metrics import RankingEvaluator
from lightning_modules.components.prompts import encode_prompts
from lightning_modules.components.schedules import warmup_cosine_factor
from lightning_modules.components.selfplay import FEEDBACK_KINDS, NEGATIVE_KINDS

log = logging.getLogger(__name__)

STAGE = "dpo"

# Negative kind of each well-known stage name (a stage may also name its kind explicitly).
STAGE_NEGATIVES = {"sp_easy": "easy", "sp_medium": "medium", "sp_hard": "hard",
                   "sp_all": "beam", "static": "random", "rf_dislike": "dislike",
                   "rf_neutral": "neutral"}


@dataclass
class PreferenceStage:
    """One stage of the curriculum.

    Attributes:
        name: stage name (``sp_easy``, ``sp_medium``, ``sp_hard``, ``rf_dislike``,
            ``rf_neutral``, ``static``, ``sp_all`` or any name with ``negatives`` set).
        epochs: epochs of the stage (pairs are regenerated before each).
        lr: peak learning rate of the stage.
        negatives: negative kind (``easy``, ``medium``, ``hard``, ``beam``, ``random``,
            ``dislike``, ``neutral``); ``None`` derives it from the name.
    """

    name: str
    epochs: int = 1
    lr: float = 1e-5
    negatives: str | None = None

    def __post_init__(self) -> None:
        if self.negatives is None:
            if self.name not in STAGE_NEGATIVES:
                raise ValueError(f"stage {self.name!r}: set 'negatives' (one of "
                                 f"{NEGATIVE_KINDS}) or use a known name {list(STAGE_NEGATIVES)}")
            self.negatives = STAGE_NEGATIVES[self.name]
        if self.negatives not in NEGATIVE_KINDS:
            raise ValueError(f"stage {self.name!r}: unknown negatives {self.negatives!r}; "
                             f"known: {NEGATIVE_KINDS}")
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError(f"stage {self.name!r}: epochs must be >= 1 and lr > 0")

    @property
    def uses_feedback(self) -> bool:
        return self.negatives in FEEDBACK_KINDS


def default_stages() -> list[PreferenceStage]:
    return [PreferenceStage(name) for name in
            ("sp_easy", "sp_medium", "sp_hard", "rf_dislike", "rf_neutral")]


def score_responses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_tokens: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Summed log-probabilities of ``M`` fixed-length responses per prompt (differentiable).

    Scoring 1 chosen + N rejected items after one prompt must not cost N + 1 prompt passes:

    * ``packed`` (default for sdpa/eager attention): ONE sequence per prompt, the prompt
      followed by the first ``L - 1`` tokens of every response, with a 4-D attention mask in
      which each response sees the prompt and its own earlier tokens only, and positions that
      restart after the prompt for every response. No KV-cache copies, one forward/backward.
    * ``cache`` (any attention, e.g. flash-attention without 4-D masks): encode the prompt,
      repeat its KV cache to the ``M`` responses, run the ``L - 1`` response steps.

    Both give the scores of separate ``prompt + response`` passes (see the tests).

    Args:
        model: HF causal LM (or a peft model around one).
        input_ids: ``[B, P]`` left-padded prompts; attention_mask: ``[B, P]``.
        response_tokens: ``[B, M, L]`` vocabulary ids of the responses (item SCIDs).
        method: ``auto``, ``packed`` or ``cache``.
    Returns:
        ``FloatTensor [B, M]``: sum over the ``L`` tokens of ``log_softmax`` over the full
        vocabulary (float32), the quantity beam search ranks by.
    """
    impl = attn_implementation(model)
    if method == "auto":
        method = "packed" if impl in ("sdpa", "eager") else "cache"
    if method == "packed" and response_tokens.shape[2] > 1:
        return _score_packed(model, input_ids, attention_mask, response_tokens, impl)
    if method not in ("packed", "cache"):
        raise ValueError(f"method must be auto, packed or cache, got {method!r}")
    return _score_cached(model, input_ids, attention_mask, response_tokens)


def _score_packed(model, input_ids, attention_mask, response_tokens, impl: str) -> torch.Tensor:
    batch, prompt_len = input_ids.shape
    _, num_resp, length = response_tokens.shape
    device = input_ids.device
    steps = length - 1
    width = num_resp * steps
    attention_mask = attention_mask.long()
    prompt_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)                   # [B, P]
    step = torch.arange(steps, device=device).repeat(num_resp)                   # [R]
    owner = torch.arange(num_resp, device=device).repeat_interleave(steps)       # [R]
    ids = torch.cat([input_ids, response_tokens[:, :, :-1].reshape(batch, width)], dim=1)
    pos = torch.cat([prompt_pos, prompt_pos[:, -1:] + 1 + step], dim=1)          # [B, P + R]
    total = prompt_len + width
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:prompt_len, :prompt_len] = torch.ones(prompt_len, prompt_len, dtype=torch.bool,
                                                   device=device).tril()
    allowed[prompt_len:, :prompt_len] = True
    allowed[prompt_len:, prompt_len:] = (owner[:, None] == owner[None, :]) & \
        (step[None, :] <= step[:, None])
    keys = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, width).bool()], 1)
    mask = allowed.unsqueeze(0) & keys.unsqueeze(1)                              # [B, T, T]
    # Left-padding query rows would see no key at all (NaN in softmax): let them see themselves.
    mask |= torch.eye(total, dtype=torch.bool, device=device).unsqueeze(0)
    mask = mask_for_attention(mask.unsqueeze(1), impl,                           # [B, 1, T, T]
                              next(model.parameters()).dtype)
    kwargs = {}
    if "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = 1 + width  # the LM head only where a response token is read
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                   use_cache=False, return_dict=True, **kwargs).logits
    logp = torch.log_softmax(logits[:, -(1 + width):].float(), dim=-1)          # [B, 1 + R, V]
    first = logp[:, 0].gather(1, response_tokens[:, :, 0])                       # [B, M]
    rest = logp[:, 1:].gather(2, response_tokens[:, :, 1:].reshape(batch, width, 1))
    return first + rest.view(batch, num_resp, steps).sum(2)


def _score_cached(model, input_ids, attention_mask, response_tokens) -> torch.Tensor:
    """KV-cache form of :func:`score_responses`.

    The prompt is encoded once and its KV cache repeated to the responses; gradients flow
    through the cache.
    """
    batch, num_resp, length = response_tokens.shape
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=length > 1, return_dict=True)
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)           # [B, V]
    logps = first.gather(1, response_tokens[:, :, 0])                         # [B, M]
    if length == 1:
        return logps
    cache = out.cache
    cache.batch_repeat_interleave(num_resp)
    mask = torch.cat([attention_mask.repeat_interleave(num_resp, dim=0),
                      attention_mask.new_ones(batch * num_resp, length - 1)], dim=1)
    steps = torch.arange(1, length, device=input_ids.device)
    pos = position_ids[:, -1].repeat_interleave(num_resp).unsqueeze(1) + steps  # [B*M, L-1]
    feed = response_tokens[:, :, :-1].reshape(batch * num_resp, length - 1)
    rest = model(input_ids=feed, attention_mask=mask, position_ids=pos, cache=cache,
                 use_cache=True, return_dict=True).logits
    rest = torch.log_softmax(rest.float(), dim=-1)                              # [B*M, L-1, V]
    target = response_tokens[:, :, 1:].reshape(batch * num_resp, length - 1, 1)
    return logps + rest.gather(2, target).squeeze(2).sum(1).view(batch, num_resp)


class PreferenceAligner(L.LightningModule):
    """Progressive (softmax-)DPO of the SFT policy; see the module docstring.

    Args:
        run_dir: pipeline run directory: reads ``sft/hf``, writes ``dpo/``.
        sft_dir: the policy's HF folder when not ``<run_dir>/sft/hf``.
        stages: the curriculum (default: sp_easy, sp_medium, sp_hard, rf_dislike, rf_neutral,
            one epoch each at lr 1e-5). Real-feedback stages are skipped, with a log message,
            when the dataset has no ratings.
        loss: the preference loss (``SoftmaxDPOLoss`` or ``DPOLoss``; same signature).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of each stage's steps with linear warm-up.
        min_lr_ratio: floor of each stage's cosine decay, as a share of the stage's lr.
        reset_optimizer: clear the AdamW moments at every stage start (each stage is a fresh
            run from the previous policy, as in the paper).
        disable_dropout: switch dropout off in the policy, so policy and reference log-probs
            are computed by the same function.
        sft_weight: weight of an extra negative log-likelihood term on the chosen item (per
            token), which keeps the chosen item's probability from sinking along with the
            rejected ones (as in RPO); 0 = the paper's pure preference loss.
        keep_start: the policy the stage starts from is a candidate of model selection:
            the pipeline (``cli.py pipeline``/``experiment``) validates it before training and,
            when no preference epoch beats it on the full validation set (ties keep it),
            tests and exports it instead (``selected`` in ``stage.json`` says which, with
            both validations). Selection on validation only, like the checkpoint's choice
            among epochs; off = the best preference epoch is always kept.
        num_beams, ks, exclude_history: evaluation protocol (as in the SFT stage).
    """

    reads_stages = ("sft",)  # the policy's HF folder

    stage_name = STAGE

    def __init__(self, run_dir: str | None = None, sft_dir: str | None = None,
                 stages: list[PreferenceStage] | None = None, loss: nn.Module | None = None,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.05,
                 min_lr_ratio: float = 0.0, reset_optimizer: bool = True,
                 disable_dropout: bool = True, sft_weight: float = 0.0,
                 keep_start: bool = False, num_beams: int = 20,
                 ks: list[int] | None = None, exclude_history: bool = True) -> None:
        super().__init__()
        ks = [5, 10] if ks is None else list(ks)
        if num_beams < max(ks):
            raise ValueError(f"num_beams ({num_beams}) must be >= max(ks) ({max(ks)})")
        stages = default_stages() if stages is None else [
            s if isinstance(s, PreferenceStage) else PreferenceStage(**s) for s in stages]
        if not stages:
            raise ValueError("stages must list at least one preference stage")
        self.save_hyperparameters(ignore=["loss"])
        self.run_dir = run_dir
        self.sft_dir = sft_dir
        self.stages = stages
        self.loss_fn = loss if loss is not None else SoftmaxDPOLoss(beta=1.0)
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.reset_optimizer = reset_optimizer
        self.disable_dropout = disable_dropout
        self.sft_weight = sft_weight
        self.keep_start = keep_start
        self.selection: dict | None = None  # set by cli.run_stage when keep_start
        self.num_beams = num_beams
        self.ks = ks
        self.exclude_history = exclude_history
        self.evaluator = RankingEvaluator(ks, exclude_history=exclude_history)
        self.last_ranks: dict = {}  # split -> (rows, ranks) of the latest evaluation
        self.policy = None  # GenerativeRecommender, built in configure_model
        self.schedule: list[PreferenceStage] = list(stages)
        self.skipped_stages: list[str] = []
        self.per_stage: dict[str, dict] = {}
        self.results: dict[str, dict[str, float]] = {}
        # Reference = trainable tensors at the stage start; not in the state_dict on purpose.
        self._reference: dict[str, torch.Tensor] | None = None
        self._active_stage: int | None = None
        self._optimizer_reset_pending = False  # cleared at the next epoch start
        self._fit_start: float | None = None

    # -- building -------------------------------------------------------------------------------
    def _datamodule(self):
        trainer = self._trainer
        return None if trainer is None else getattr(trainer, "datamodule", None)

    def policy_dir(self) -> Path:
        if self.sft_dir:
            return Path(self.sft_dir)
        if self.run_dir:
            return Path(self.run_dir) / "sft" / "hf"
        raise ValueError("PreferenceAligner needs run_dir (with sft/hf) or sft_dir")

    def configure_model(self) -> None:
        """Load the SFT policy (idempotent) and connect it to the DataModule's prompts."""
        if self.policy is None:
            self.policy = self._load_start()
            if self.disable_dropout:
                _disable_dropout(self.policy.model)
            # from_pretrained returns eval mode, and Lightning keeps module modes as found.
            self.policy.train()
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "attach_tokenizer"):
            self.policy.attach_data(dm)

    def prepare(self, datamodule) -> PreferenceAligner:
        """Connect to a set-up DataModule without a Trainer (tests, benchmarks): load the
        policy, attach the prompts, apply the feedback availability. Returns ``self``."""
        datamodule.setup("fit")
        self.configure_model()
        self.policy.attach_data(datamodule)
        self.set_feedback_available(datamodule.has_feedback, datamodule.dataset_name)
        return self

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if stage == "fit" and dm is not None and hasattr(dm, "has_feedback"):
            self.set_feedback_available(dm.has_feedback, getattr(dm, "dataset_name", ""))

    def set_feedback_available(self, available: bool, dataset: str = "") -> None:
        """Drop the real-feedback stages from the schedule when the data have no ratings."""
        if available:
            self.schedule, self.skipped_stages = list(self.stages), []
            return
        self.schedule = [s for s in self.stages if not s.uses_feedback]
        self.skipped_stages = [s.name for s in self.stages if s.uses_feedback]
        if self.skipped_stages:
            log.warning("dataset %s has no ratings: real-feedback stages %s are skipped",
                        dataset or "?", ", ".join(self.skipped_stages))
        if not self.schedule:
            raise ValueError("no preference stage can run: every stage needs ratings and the "
                             "dataset has none")

    def configure_callbacks(self):
        from callbacks.selfplay import SelfPlayCallback

        present = self._trainer is not None and any(
            isinstance(cb, SelfPlayCallback) for cb in self.trainer.callbacks)
        if present:
            return []
        log.info("no SelfPlayCallback configured: adding one with default settings")
        return [SelfPlayCallback()]

    # -- curriculum -----------------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.schedule)

    def stage_index_at(self, epoch: int) -> int | None:
        """Index into :attr:`schedule` of the stage that trains in ``epoch`` (``None`` past
        the end)."""
        end = 0
        for i, s in enumerate(self.schedule):
            end += s.epochs
            if epoch < end:
                return i
        return None

    def stage_at(self, epoch: int) -> PreferenceStage | None:
        i = self.stage_index_at(epoch)
        return None if i is None else self.schedule[i]

    def stage_bounds(self, index: int) -> tuple[int, int]:
        """First epoch and one past the last epoch of stage ``index``."""
        start = sum(s.epochs for s in self.schedule[:index])
        return start, start + self.schedule[index].epochs

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.policy.model.named_parameters() if p.requires_grad}

    def _load_start(self):
        """The policy the stage starts from, loaded from :meth:`policy_dir`."""
        from lightning_modules.generative_recommender import GenerativeRecommender

        path = self.policy_dir()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no SFT policy; run the 'sft' stage first "
                                    "(python cli.py pipeline ... --stages sft)")
        return GenerativeRecommender.from_pretrained_dir(
            path, num_beams=self.num_beams, ks=self.ks, exclude_history=self.exclude_history)

    def restore_start(self) -> None:
        """Put the policy the stage started from back (its trainable tensors, read again from
        :meth:`policy_dir`, copied in place: wrappers such as DDP keep their parameters)."""
        source = dict(self._load_start().model.named_parameters())
        with torch.no_grad():
            for name, p in self.trainable_parameters().items():
                if name not in source or source[name].shape != p.shape:
                    raise RuntimeError(f"{self.policy_dir()}: the starting policy has no "
                                       f"parameter {name} of shape {tuple(p.shape)}")
                p.copy_(source[name].to(device=p.device, dtype=p.dtype))

    def begin_stage(self, index: int) -> bool:
        """Open stage ``index``: the current policy becomes the frozen reference and the
        optimizer starts afresh. Idempotent; returns whether a new stage was opened."""
        if index == self._active_stage:
            return False
        self._reference = {n: p.detach().clone() for n, p in self.trainable_parameters().items()}
        self._active_stage = index
        # The moments are cleared when the stage's first epoch starts (on_train_epoch_start):
        # after a resume, that is after Lightning has restored the optimizer.
        self._optimizer_reset_pending = self.reset_optimizer
        log.info("preference stage %s (%d/%d): reference reset, negatives=%s, lr=%g",
                 self.schedule[index].name, index + 1, len(self.schedule),
                 self.schedule[index].negatives, self.schedule[index].lr)
        return True

    @contextmanager
    def reference_weights(self):
        """Inside the block the policy computes with the reference weights (``.data`` swap, so
        no extra copy; swapped back on exit, also on error)."""
        if self._reference is None:
            raise RuntimeError("no reference yet: begin_stage() takes it")
        params = self.trainable_parameters()
        swapped = []
        try:
            with torch.no_grad():
                for name, ref in self._reference.items():
                    p = params[name]
                    if ref.device != p.device:  # restored from a checkpoint before the move
                        ref = ref.to(p.device)
                    p.data, self._reference[name] = ref, p.data
                    swapped.append(name)
            yield
        finally:
            with torch.no_grad():
                for name in swapped:
                    p = params[name]
                    p.data, self._reference[name] = self._reference[name], p.data

    # -- scoring --------------------------------------------------------------------------------
    def _policy_device(self) -> torch.device:
        return next(self.policy.model.parameters()).device

    def response_logps(self, prompts: list[str], items: torch.Tensor) -> torch.Tensor:
        """``[B, M]`` policy log-probs of items ``[B, M]`` (ids >= 0) after each prompt."""
        device = self._policy_device()
        enc = encode_prompts(self.policy.tokenizer, prompts)
        tokens = self.policy.item_tokens.to(device)[items.to(device)]   # [B, M, L]
        return score_responses(self.policy.model, enc["input_ids"].to(device),
                               enc["attention_mask"].to(device), tokens)

    @torch.no_grad()
    def reference_logps(self, prompts: list[str], items: torch.Tensor,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, M]`` reference log-probs (no grad; eval mode). ``valid`` (``[B, M]`` bool)
        marks real items; the others score 0 and cost nothing beyond the batch's widest row."""
        was_training = self.policy.model.training
        self.policy.model.eval()
        try:
            out = torch.zeros(items.shape, dtype=torch.float32)
            width = items.shape[1] if valid is None else max(1, int(valid.sum(1).max()))
            safe = items[:, :width].clamp(min=0)
            # Always swap (a pointer swap, free): whether the policy moved since the stage
            # start is not this method's business.
            with self.reference_weights():
                scores = self.response_logps(prompts, safe)
            out[:, :width] = scores.float().cpu()
            if valid is not None:
                out = out.masked_fill(~valid, 0.0)
            return out
        finally:
            self.policy.model.train(was_training)

    # -- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_start = time.time()
        trainer = self.trainer
        total = self.total_epochs
        if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > total:
            # The curriculum decides the length of training.
            trainer.fit_loop.max_epochs = total
        elif trainer.max_epochs < total:
            log.warning("max_epochs=%d < the curriculum's %d epochs: stages after epoch %d do "
                        "not run", trainer.max_epochs, total, trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        if self._optimizer_reset_pending and self._trainer is not None:
            for opt in self.trainer.optimizers:
                opt.state.clear()
            self._optimizer_reset_pending = False
        epoch = self.current_epoch
        stage = self.stage_at(epoch)
        dm = self._datamodule()
        pairs = getattr(dm, "pairs", None)
        if stage is None or pairs is None:
            return
        record = self.per_stage.setdefault(stage.name, {})
        record.setdefault("pairs", {})[str(epoch)] = dict(pairs.stats)
        if len(pairs) == 0:
            # Recorded per epoch; the stage counts as skipped when none of its epochs had pairs.
            record.setdefault("empty_epochs", []).append(int(epoch))
        for key, value in pairs.stats.items():
            self.log(f"pairs/{stage.name}/{key}", float(value), on_step=False, on_epoch=True,
                     batch_size=1)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Per-stage schedule: linear warm-up then cosine decay over the stage's steps.
        index = self.stage_index_at(self.current_epoch)
        if index is None:
            return
        stage = self.schedule[index]
        first, _ = self.stage_bounds(index)
        per_epoch = max(1, int(self.trainer.num_training_batches))
        total = stage.epochs * per_epoch
        step = (self.current_epoch - first) * per_epoch + batch_idx
        factor = warmup_cosine_factor(step, total, self.warmup_ratio, self.min_lr_ratio)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = stage.lr * factor

    def preference_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean preference loss of a pair batch (:func:`collate_pairs`) and reward statistics.

        The chosen item and the ``n`` rejected ones share one prompt pass
        (:func:`score_responses`); the reference log-probs come with the batch.
        """
        items = torch.cat([batch["chosen"].unsqueeze(1), batch["rejected"].clamp(min=0)], dim=1)
        logps = self.response_logps(batch["prompts"], items)                  # [B, 1 + n]
        mask = batch["rejected_mask"].to(logps.device)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            logps[:, 0], logps[:, 1:], batch["ref_chosen"].to(logps),
            batch["ref_rejected"].to(logps), rejected_mask=mask)
        stats = reward_statistics(chosen_rewards, rejected_rewards, mask)
        loss = losses.mean()
        # Per-token NLL of the chosen item (its log-prob is a sum over the SCID tokens).
        nll = -logps[:, 0].mean() / self.policy.item_tokens.shape[1]
        stats["chosen_nll"] = nll.detach()
        if self.sft_weight > 0:
            loss = loss + self.sft_weight * nll
        return loss, stats

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stage = self.stage_at(self.current_epoch)
        loss, stats = self.preference_loss(batch)
        bs = len(batch["prompts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"train/{stage.name}/loss", loss, on_step=False, on_epoch=True, batch_size=bs,
                 sync_dist=True)
        for key, value in stats.items():
            self.log(f"train/{stage.name}/{key}", value, on_step=False, on_epoch=True,
                     batch_size=bs, sync_dist=True, prog_bar=key == "rewards/accuracy")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def on_train_epoch_end(self) -> None:
        stage = self.stage_at(self.current_epoch)
        if stage is None:
            return
        prefix = f"train/{stage.name}/"
        summary = {k[len(prefix):]: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith(prefix)}
        self.per_stage.setdefault(stage.name, {}).setdefault("train", {})[
            str(self.current_epoch)] = summary

    # -- resume -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The curriculum position and the frozen reference, so that a killed stage resumes
        # inside its curriculum with the same reference (cli.run_stage resumes from last.ckpt).
        checkpoint["preference_state"] = {
            "active_stage": self._active_stage,
            "reference": None if self._reference is None else
            {n: t.detach().cpu() for n, t in self._reference.items()},
            "optimizer_reset_pending": self._optimizer_reset_pending,
            "per_stage": self.per_stage, "skipped_stages": list(self.skipped_stages)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("preference_state")
        trainer = self._trainer
        # Only a resumed fit continues the curriculum; validate/test with the best checkpoint
        # keep this fit's records (per_stage holds every stage's validation).
        if not state or trainer is None or trainer.state.fn != "fit":
            return
        self._active_stage = state["active_stage"]
        self._reference = state["reference"]
        self._optimizer_reset_pending = bool(state["optimizer_reset_pending"])
        self.per_stage = state["per_stage"]
        self.skipped_stages = list(state["skipped_stages"])

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.trainable_parameters().items():
            (no_decay if p.dim() < 2 or "embed" in name or "norm" in name else decay).append(p)
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=self.schedule[0].lr, betas=(0.9, 0.95))

    # -- evaluation -----------------------------------------------------------------------------
    def _eval_step(self, batch: dict, split: str) -> None:
        prompts = self.policy.build_prompts(batch["rows"], split)
        exclude = batch["exclude"] if self.exclude_history else None
        items, _ = self.policy.recommend(prompts, exclude, self.num_beams)
        self.evaluator.update_ranked(split, items, batch["target"].to(items.device),
                                     rows=batch["rows"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "valid")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_split(self, split: str, prefix: str) -> dict[str, float]:
        metrics = self.evaluator.compute(split)
        self.last_ranks[split] = self.evaluator.per_user(split)  # per-user ranks for export
        self.evaluator.reset(split)
        self.results[split] = metrics
        for k, v in metrics.items():
            self.log(f"{prefix}/{k}", v, prog_bar=k == f"ndcg@{max(self.ks)}")
        return metrics

    def on_validation_epoch_end(self) -> None:
        metrics = self._log_split("valid", "val")
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        stage = self.stage_at(self.current_epoch)
        if stage is not None:
            # The last validation inside a stage is the stage's result.
            self.per_stage.setdefault(stage.name, {})["valid"] = dict(metrics)
            self.per_stage[stage.name]["epoch"] = int(self.current_epoch)
            got = self.last_ranks.get("valid")
            if got is not None:  # fewer than all users with data.val_max_users
                self.per_stage[stage.name]["valid_users"] = int(len(got[0]))
            self.log_dict({f"val/{stage.name}/{k}": v for k, v in metrics.items()})

    def on_test_epoch_end(self) -> None:
        self._log_split("test", "test")

    # -- export ---------------------------------------------------------------------------------
    def stage_dir(self) -> Path:
        return Path(self.run_dir) / STAGE

    def export_artifacts(self) -> dict:
        """Write ``<run_dir>/dpo/<stage>/`` (pair statistics, metrics) and ``<run_dir>/dpo/hf``
        (the policy as ``save_pretrained``, loadable like the SFT export). Returns the stage
        record: ``{"per_stage": {stage: {"valid": {...}}}, ...}``."""
        if not self.run_dir:
            raise ValueError("export_artifacts needs run_dir")
        out = self.stage_dir()
        per_stage = {}
        for stage in self.schedule:
            rec = self.per_stage.get(stage.name, {})
            atomic_write_json(out / stage.name / "pairs.json", {
                "stage": stage.name, "negatives": stage.negatives,
                "per_epoch": rec.get("pairs", {})})
            atomic_write_json(out / stage.name / "metrics.json", {
                "stage": asdict(stage), "valid": rec.get("valid", {}),
                "valid_epoch": rec.get("epoch"), "train": rec.get("train", {})})
            per_stage[stage.name] = {"valid": rec.get("valid", {})}
            if "valid_users" in rec:
                per_stage[stage.name]["valid_users"] = rec["valid_users"]
            if len(rec.get("empty_epochs", [])) >= stage.epochs:
                per_stage[stage.name]["skipped"] = (
                    f"no pairs: no prompt had a {stage.negatives!r} negative in any of its "
                    f"{stage.epochs} epoch(s); the curriculum went on")
        self.policy.export_artifacts(out_dir=out / "hf")
        record = {
            "dataset": getattr(getattr(self.policy.prompts, "dataset", None), "name", None),
            "per_stage": per_stage,
            "stages": [asdict(s) for s in self.schedule],
            "skipped_stages": list(self.skipped_stages),
            "loss": type(self.loss_fn).__name__,
            "beta": getattr(self.loss_fn, "beta", None),
            "policy_from": os.path.relpath(self.policy_dir(), self.run_dir),
            "hf_dir": os.path.relpath(out / "hf", self.run_dir),
            "protocol": {"exclude_history": self.exclude_history, "num_beams": self.num_beams,
                         "ks": self.ks},
        }
        for split in ("valid", "test"):
            if split in self.results:
                record.setdefault("final", {})[split] = self.results[split]
        if self.selection is not None:
            record["selected"] = self.selection
        if self._fit_start is not None:
            record["fit_seconds"] = round(time.time() - self._fit_start, 1)
        atomic_write_json(out / "metrics.json", record)
        return record


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop"):
        if config is not None and hasattr(config, key):
            setattr(config, key, 0.0)
