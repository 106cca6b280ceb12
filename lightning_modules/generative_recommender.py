"""The SFT stage: an HF causal LM that generates the SCID of the next item.

``GenerativeRecommender`` trains on the multi-task examples of
:class:`datamodules.sft_data.SFTDataModule` (loss on response tokens only), evaluates by
trie-constrained beam search over the catalogue (history items excluded by default, the
protocol's rule) and exports an HF ``save_pretrained`` folder that the DPO stage starts from.

The model is built in :meth:`configure_model`, after the DataModule has loaded the data: a
from-scratch backbone trains its BPE tokenizer on the dataset's text. Checkpoints carry the
tokenizer and the SCID map, so ``load_from_checkpoint`` rebuilds the same model without data.

Public methods the DPO stage reuses: :meth:`build_prompts`, :meth:`recommend`,
:meth:`sequence_logprobs`, :meth:`export_artifacts`, :meth:`from_pretrained_dir`, plus the
attributes ``model``, ``tokenizer``, ``scid_map``, ``trie`` and ``prompts``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from lightning_modules.components.artifacts import (
    ArtifactError,
    atomic_write_json,
    atomic_write_text,
    mark_stage_complete,
    read_json,
)
from lightning_modules.components.backbone import (
    BackboneConfig,
    LoraSettings,
    as_backbone_config,
    as_lora_settings,
    build_model,
    build_tokenizer,
    count_parameters,
    loadable_attn_implementation,
)
from lightning_modules.components.decoding import ItemTrie, constrained_beam_search
from lightning_modules.components.lm_loss import causal_lm_loss
from lightning_modules.components.metrics import RankingEvaluator
from lightning_modules.components.precision import (
    check_train_precision,
    effective_precision,
    training_autocast,
)
from lightning_modules.components.prompts import (
    CATALOG_FILE,
    IGNORE_INDEX,
    PromptBuilder,
    collate_encoded,
    encode_prompts,
    encode_segments,
    pad_items,
)
from lightning_modules.components.schedules import warmup_cosine
from lightning_modules.components.scid_init import (
    SCID_INITS,
    init_scid_embeddings,
    load_codebooks,
    tokenizer_checkpoint,
)
from lightning_modules.components.scid_map import REFRESHED_SPLITS, SCIDMap, load_scid_map

log = logging.getLogger(__name__)

STAGE = "sft"
SFT_INFO_FILE = "align3gr_sft.json"


class GenerativeRecommender(L.LightningModule):
    """LLM-based generative recommender (Align3GR behaviour level).

    Args:
        run_dir: pipeline run directory: reads ``tokenizer/scid_map.json`` (unless the
            DataModule supplies the map), writes ``sft/`` (HF folder, metrics, stage.json).
        backbone: which causal LM and how to fine-tune it (:class:`BackboneConfig`).
        lora: LoRA settings, used when ``backbone.finetuning == "lora"``.
        lr: peak learning rate (AdamW). weight_decay: AdamW weight decay.
        warmup_ratio: share of the optimizer steps with linear warm-up; then cosine decay.
        min_lr_ratio: floor of the cosine decay as a share of ``lr``.
        num_beams: beam width of constrained beam search (>= max(ks)).
        ks: cut-offs of Recall@K / NDCG@K.
        exclude_history: never recommend items the user already interacted with.
        predict_top_k: items per user written by ``predict``.
        export_on_fit_end: write ``<run_dir>/sft`` (HF folder, stage.json) when fit ends
            (``cli.py`` exports after fit/test by itself; this is for plain Trainer use).
        seed: seed of the backbone's random initialisation (``None``: the run's
            ``seed_everything`` value, so that the seeds of an experiment vary it too).
        label_smoothing: training cross-entropy smoothing in ``[0, 1)``.
        scid_init: ``codebook`` (SCID embedding rows start at the tokenizer's codebook
            vectors) or ``random``.
        pack_rows: pack the rows of a training batch into shared sequences with a
            block-diagonal causal mask instead of padding them
            (:func:`~lightning_modules.components.lm_loss.pack_rows`): the same loss and
            gradient over fewer cells. Used where the attention reads 4-D masks (sdpa,
            eager); flash-attention trains on the padded batch. Off by default: on ML-100K
            the packed stage was 1.12x faster and, over 3 seeds, not distinguishable from the
            padded one on validation but lower on test (README "Speed"); on for Beauty,
            whose rows are mostly padding.
        train_precision: ``32`` or ``bf16``: training steps run their matrix products in
            bfloat16 under autocast (float32 weights and optimizer; attention in float32 on
            the CPU); validation, test and export decode in float32 either way. Falls back to
            ``32`` on a device without native bfloat16
            (:mod:`~lightning_modules.components.precision`).
        user_scid_refresh: test (and ``predict``) prompts show each user's SCID re-encoded
            from the history those prompts show (training items + the validation item; + the
            test item), as validation prompts show the SCID of the training history they
            follow (:attr:`SCIDMap.user_refreshed_codes`). Off: every prompt shows the
            training-history SCID. Training and validation are the same either way.
        decode_prior: ``alpha``; beam search ranks items by ``log p(item | prompt) -
            alpha * log prior(item)``, the prior being the items' counts in the training
            sequences (plus one) spread over the code tree level by level
            (:meth:`ItemTrie.log_prior`): ``alpha > 0`` moves beams toward rarely seen
            items, ``alpha < 0`` toward popular ones. ``0`` (default): the plain
            log-probabilities. Training is the same either way.
    """

    reads_stages = ("tokenizer",)  # the SCID map

    stage_name = STAGE  # the run-directory folder the CLI exports into

    def __init__(self, run_dir: str | None = None, backbone: BackboneConfig | None = None,
                 lora: LoraSettings | None = None, lr: float = 2e-3,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.02,
                 min_lr_ratio: float = 0.05, num_beams: int = 20,
                 ks: list[int] | None = None, exclude_history: bool = True,
                 predict_top_k: int = 10, export_on_fit_end: bool = False,
                 seed: int | None = None, label_smoothing: float = 0.0,
                 scid_init: str = "random", pack_rows: bool = False,
                 train_precision: str = "32", user_scid_refresh: bool = False,
                 decode_prior: float = 0.0) -> None:
        super().__init__()
        ks = [5, 10] if ks is None else list(ks)
        if num_beams < max(ks):
            raise ValueError(f"num_beams ({num_beams}) must be >= max(ks) ({max(ks)})")
        self.save_hyperparameters()
        self.run_dir = run_dir
        self.backbone_cfg = as_backbone_config(backbone)
        self.lora_cfg = as_lora_settings(lora)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.num_beams = num_beams
        self.ks = ks
        self.exclude_history = exclude_history
        self.predict_top_k = predict_top_k
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing must be in [0, 1), got "
                             f"{label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        if scid_init not in SCID_INITS:
            raise ValueError(f"model.init_args.scid_init must be one of {list(SCID_INITS)}, "
                             f"got {scid_init!r}")
        self.scid_init = scid_init
        self.pack_rows = bool(pack_rows)
        self.train_precision = check_train_precision(train_precision)
        self._step_precision = "32"  # what the training steps run at (set when a fit starts)
        self.user_scid_refresh = bool(user_scid_refresh)
        if not isinstance(decode_prior, (int, float)) or not -10.0 < decode_prior < 10.0:
            raise ValueError(f"model.init_args.decode_prior must be a number in (-10, 10), got "
                             f"{decode_prior!r}")
        self.decode_prior = float(decode_prior)
        self.prior_counts: list[int] | None = None  # training counts per item (the prior)
        self._node_bias: list[torch.Tensor] | None = None
        self.export_on_fit_end = export_on_fit_end
        if seed is None:  # lightning's seed_everything records its seed here
            seed = int(os.environ.get("PL_GLOBAL_SEED", 42))
        self.seed = seed
        self.evaluator = RankingEvaluator(ks, exclude_history=exclude_history)
        self.last_ranks: dict = {}  # split -> (rows, ranks) of the latest evaluation
        self.model = None
        self.tokenizer = None
        self.scid_map: SCIDMap | None = None
        self.trie: ItemTrie | None = None
        self.item_tokens: torch.Tensor | None = None  # [num_items, L] vocabulary ids
        self.scid_token_ids: list[int] = []
        self.prompts: PromptBuilder | None = None
        self._split = None
        self._fit_start: float | None = None
        self._predictions: list[dict] = []
        self.predict_output: str | None = None  # set by `cli.py predict --output FILE`
        self.last_predictions_path: Path | None = None
        self.results: dict[str, dict[str, float]] = {}

    # -- building ---------------------------------------------------------------------------
    def _datamodule(self):
        trainer = self._trainer
        return None if trainer is None else getattr(trainer, "datamodule", None)

    def configure_model(self) -> None:
        """Build tokenizer + model once the DataModule's data is there (idempotent)."""
        # Lightning calls this under its init-device context (e.g. cuda): build on the CPU, where
        # the tokenizer-side tables (item tokens, trie) live; the strategy moves the model later.
        with torch.device("cpu"):
            self._configure_model()

    def _configure_model(self) -> None:
        dm = self._datamodule()
        if self.model is None:
            scid_map, corpus = None, None
            if dm is not None and hasattr(dm, "prompts"):
                dm.setup("fit")
                scid_map = dm.scid_map
                corpus = dm.prompts.text_corpus()
            elif self.backbone_cfg.name_or_path is None:
                # No data to train the text tokenizer on: load_from_checkpoint is calling, and
                # on_load_checkpoint rebuilds from the tokenizer stored in the checkpoint.
                return
            elif self.run_dir:
                scid_map = load_scid_map(Path(self.run_dir) / "tokenizer")
            if scid_map is None:
                raise RuntimeError("GenerativeRecommender needs an SCID map: give run_dir or use "
                                   "it with an SFTDataModule")
            tokenizer, ids = build_tokenizer(self.backbone_cfg, corpus, self._scid_vocab(scid_map))
            # Only a fit starts from the codebooks: validate/test/predict load trained weights.
            fitting = self._trainer is None or getattr(self._trainer.state.fn, "value",
                                                       None) == "fit"
            prepare = (self._codebook_init(dm, tokenizer, scid_map)
                       if self.scid_init == "codebook" and fitting else None)
            self._install(tokenizer, scid_map, ids, prepare=prepare)
        if dm is not None and hasattr(dm, "attach_tokenizer"):
            self.attach_data(dm)

    def _codebook_init(self, dm, tokenizer, scid_map: SCIDMap):
        """``prepare(model)`` for ``scid_init: codebook``: the SCID rows from the codebooks of
        the tokenizer checkpoint next to the SCID map."""
        if dm is not None and hasattr(dm, "scid_path"):
            folder = dm.scid_path()  # the SCID map's folder: its checkpoint matches
        elif self.run_dir:
            folder = Path(self.run_dir) / "tokenizer"
        else:
            raise ValueError("model.init_args.scid_init: codebook needs the run directory "
                             "(model.init_args.run_dir) with the tokenizer stage")
        path = tokenizer_checkpoint(folder)
        books = load_codebooks(path)

        def prepare(model):
            n = init_scid_embeddings(model, tokenizer, scid_map, books, seed=self.seed)
            log.info("scid_init: %d SCID embedding rows from the codebooks of %s", n, path)

        return prepare

    @staticmethod
    def _scid_vocab(scid_map: SCIDMap) -> list[str]:
        return scid_map.item_vocabulary() + scid_map.user_vocabulary()

    def _install(self, tokenizer, scid_map: SCIDMap, scid_ids: list[int], model=None,
                 prepare=None) -> None:
        """Set tokenizer, SCID map, item-token table and trie; build the model unless given
        (``prepare(model)`` runs on a built model before its fine-tuning mode is applied)."""
        self.tokenizer = tokenizer
        self.scid_map = scid_map
        self.scid_token_ids = list(scid_ids)
        if model is None:
            model = build_model(self.backbone_cfg, tokenizer, self.scid_token_ids, self.lora_cfg,
                                seed=self.seed, prepare=prepare)
        self.model = model
        rows = [scid_map.item_token_list(i) for i in range(scid_map.num_items)]
        flat = tokenizer.convert_tokens_to_ids([t for r in rows for t in r])
        self.item_tokens = torch.tensor(flat, dtype=torch.long).view(scid_map.num_items, -1)
        self.trie = ItemTrie(self.item_tokens)
        n = count_parameters(self.model)
        log.info("backbone: %s, %d parameters (%d trainable), vocabulary %d",
                 self.backbone_cfg.name_or_path or f"built {self.backbone_cfg.arch}",
                 n["total"], n["trainable"], len(tokenizer))

    def attach_data(self, datamodule) -> None:
        """Take the DataModule's prompt builder and split; give it the tokenizer."""
        datamodule.setup("fit")
        self.prompts = datamodule.prompts
        self._split = datamodule.split
        if self.decode_prior:
            self.set_prior_counts(self._split.train_item_counts().tolist())
        if self.scid_map is not None and datamodule.scid_map is not None and \
                not torch.equal(self.scid_map.item_codes, datamodule.scid_map.item_codes):
            raise ValueError("the DataModule's SCID map differs from the model's")
        refreshed = set(self.prompts.scid_map.user_refreshed_codes)
        if self.user_scid_refresh and self.prompts.inject_user and \
                not set(REFRESHED_SPLITS) <= refreshed:
            raise ValueError(
                "model.init_args.user_scid_refresh=true needs user SCIDs refreshed for "
                f"{list(REFRESHED_SPLITS)} in the tokenizer stage's scid_map.json (it has "
                f"{sorted(refreshed) or 'none'}): rerun the sasrec and tokenizer stages with "
                "this version, which export them")
        datamodule.attach_tokenizer(self.tokenizer)

    def set_prior_counts(self, counts) -> None:
        """The items' training counts that ``decode_prior`` divides out (one per item)."""
        counts = [int(c) for c in counts]
        if self.trie is not None and len(counts) != self.trie.num_items:
            raise ValueError(f"prior counts: {len(counts)} values for {self.trie.num_items} "
                             "items")
        self.prior_counts = counts
        self._node_bias = None

    def node_bias(self) -> list[torch.Tensor] | None:
        """The beam-search step bias of ``decode_prior`` (None when it is 0)."""
        if not self.decode_prior:
            return None
        if self._node_bias is None:
            if self.prior_counts is None:
                raise RuntimeError("model.init_args.decode_prior != 0 needs the items' training "
                                   "counts: call attach_data(datamodule) first")
            self._node_bias = [-self.decode_prior * b
                               for b in self.trie.log_prior(self.prior_counts)]
        return self._node_bias

    # -- public API (reused by the DPO stage) -----------------------------------------------
    def build_prompts(self, rows, stage: str) -> list[str]:
        """Next-item prompts of split rows ``rows`` (``[B]``) for ``stage``.

        ``valid``: history = training items; ``test``: + the validation item; ``predict``:
        + the test item (recommendations after everything known). With
        ``user_scid_refresh``, the test and predict prompts show the user SCID re-encoded
        from that history.
        """
        if self.prompts is None or self._split is None:
            raise RuntimeError("no data attached: call attach_data(datamodule) first")
        split = self._split
        mh = self.prompts.max_history
        out = []
        for row in torch.as_tensor(rows).tolist():
            hist = split.history(row, stage, mh)
            out.append(self.prompts.seqrec_prompt(int(split.users[row]), hist,
                                                  refreshed_for=self.refreshed_for(stage)))
        return out

    def refreshed_for(self, stage: str) -> str | None:
        """The split whose refreshed user SCIDs ``stage``'s prompts show (None: the
        training-history ones)."""
        return stage if self.user_scid_refresh and stage in REFRESHED_SPLITS else None

    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def recommend(self, prompts: list[str], exclude=None, num_beams: int | None = None,
                  prior: bool = True):
        """Top items for each prompt by trie-constrained beam search.

        Args:
            prompts: ``B`` prompt strings (from :meth:`build_prompts`).
            exclude: per prompt, item ids never to return (``list[list[int]]`` or
                ``LongTensor [B, H]`` padded with -1), or ``None``.
            num_beams: beam width ``W`` (default: the module's ``num_beams``).
            prior: decode with ``decode_prior`` (when it is not 0); ``False``: the model's own
                beams and log-probabilities (self-play's candidates and reference scores).
        Returns:
            ``items`` ``LongTensor [B, W]`` (internal item ids, best first, -1 if fewer) and
            ``scores`` ``FloatTensor [B, W]`` (summed log-probabilities, plus the prior's
            bias with ``decode_prior``).
        """
        num_beams = num_beams or self.num_beams
        device = self._model_device()
        enc = encode_prompts(self.tokenizer, prompts)
        if exclude is not None and not isinstance(exclude, torch.Tensor):
            exclude = pad_items(exclude)
        if exclude is not None:
            exclude = exclude.to(device)
        if self.trie.device != device:
            self.trie = self.trie.to(device)  # once, not at every call
        bias = self.node_bias() if prior else None
        if bias is not None and bias[0].device != device:
            self._node_bias = bias = [b.to(device) for b in bias]  # once, as the trie
        was_training = self.model.training
        self.model.eval()  # dropout off; beam search needs deterministic scores
        try:
            items, scores = constrained_beam_search(
                self.model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                self.trie, num_beams=num_beams, exclude_items=exclude,
                node_bias=bias)
        finally:
            self.model.train(was_training)
        return items, scores

    def sequence_logprobs(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Sum of log-probabilities of each response's tokens after its prompt (with grad).

        Args:
            prompts: ``B`` prompts; responses: ``B`` responses (e.g. item SCID strings).
        Returns:
            ``FloatTensor [B]``.
        """
        rows = encode_segments(self.tokenizer, [[(p, False), (r, True)]
                                                for p, r in zip(prompts, responses)])
        batch = collate_encoded(rows, self.tokenizer.pad_token_id)
        batch = {k: v.to(self._model_device()) for k, v in batch.items()}
        logits = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = labels != IGNORE_INDEX
        tok = logp.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
        return (tok * mask).sum(dim=1)

    def item_response(self, item: int) -> str:
        """The response string of an item (its SCID tokens)."""
        return self.scid_map.item_string(int(item))

    # -- training ---------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        # The LM head runs on the labelled positions only (same loss as HF's labels=...), and
        # with pack_rows the rows share sequences instead of padding (same loss and gradient).
        # train_precision bf16: the step's matrix products in bfloat16 (weights, gradients and
        # optimizer state stay float32); evaluation always decodes in float32.
        with training_autocast(self._step_precision, self.device):
            loss = causal_lm_loss(self.model, batch["input_ids"], batch["attention_mask"],
                                  batch["labels"], label_smoothing=self.label_smoothing,
                                  pack=self.pack_rows)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        # Token throughput: real (unpadded) tokens of this batch.
        self.log("train/tokens", batch["attention_mask"].sum().float(), reduce_fx="sum",
                 on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # No decay on norms, biases and embeddings (rare SCID rows would shrink to 0).
            (no_decay if p.dim() < 2 or "embed" in name or "norm" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=self.lr, betas=(0.9, 0.98))
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine(opt, total, self.warmup_ratio,
                                                                self.min_lr_ratio)}

    # -- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch, split: str) -> None:
        prompts = self.build_prompts(batch["rows"], "valid" if split == "valid" else "test")
        exclude = batch["exclude"] if self.exclude_history else None
        items, _ = self.recommend(prompts, exclude, self.num_beams)
        self.evaluator.update_ranked(split, items, batch["target"].to(items.device),
                                     rows=batch["rows"])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "valid")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _log_split(self, split: str, prefix: str) -> None:
        metrics = self.evaluator.compute(split)
        self.last_ranks[split] = self.evaluator.per_user(split)  # per-user ranks for export
        self.evaluator.reset(split)
        self.results[split] = metrics
        for k, v in metrics.items():
            self.log(f"{prefix}/{k}", v, prog_bar=k == f"ndcg@{max(self.ks)}", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_split("valid", "val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test", "test")

    def on_test_end(self) -> None:
        if self.run_dir and self.trainer.is_global_zero:
            # metrics.json only: stage.json belongs to whoever exports the stage (the pipeline
            # or `cli.py fit`), so a later `cli.py test` never rewrites a finished stage.
            self._write_metrics(complete=False)

    # -- prediction -------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx):
        prompts = self.build_prompts(batch["rows"], "predict")
        exclude = batch["exclude"] if self.exclude_history else None
        items, scores = self.recommend(prompts, exclude, max(self.num_beams, self.predict_top_k))
        ds = self.prompts.dataset
        out = []
        for r, its, scs in zip(batch["rows"].tolist(), items.tolist(), scores.tolist()):
            keep = [(i, s) for i, s in zip(its, scs) if i >= 0][: self.predict_top_k]
            user = int(self._split.users[r])
            out.append({"user": ds.user_ids[user],
                        "items": [ds.item_ids[i] for i, _ in keep],
                        "titles": [self.prompts.item_title(i) for i, _ in keep],
                        "scores": [round(float(s), 5) for _, s in keep]})
        self._predictions.extend(out)
        return out

    def predictions_path(self) -> Path | None:
        """Where ``predict`` writes: ``predict_output`` when set (``cli.py predict --output``),
        else beside the checkpoint it loaded, else ``<run_dir>/sft/predictions.jsonl``."""
        if self.predict_output:
            return Path(self.predict_output)
        ckpt = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if ckpt:
            return Path(ckpt).parent / "predictions.jsonl"
        return Path(self.run_dir) / STAGE / "predictions.jsonl" if self.run_dir else None

    def on_predict_epoch_end(self) -> None:
        path = self.predictions_path()
        if path is None:
            log.warning("predict: no --output, checkpoint or run_dir; predictions not written")
            return
        if self.trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self.trainer.global_rank}{path.suffix}")
        text = "".join(json.dumps(p) + "\n" for p in self._predictions)
        atomic_write_text(path, text)
        self.last_predictions_path = path
        self._predictions = []

    # -- checkpoints ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_start = time.time()
        # The training steps' precision on this device, decided once per fit.
        self._step_precision = effective_precision(self.train_precision, self.device, STAGE)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Everything needed to rebuild the model without the data: tokenizer files + SCID map.
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            files = {f: Path(tmp, f).read_text() for f in os.listdir(tmp)
                     if Path(tmp, f).is_file()}
        checkpoint["sft_assets"] = {"tokenizer_files": files,
                                    "scid_map": self.scid_map.to_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from transformers import AutoTokenizer

        assets = checkpoint.get("sft_assets")
        if assets is None:
            return
        saved = assets["tokenizer_files"].get("tokenizer.json")
        if self.model is not None and self.tokenizer is not None and saved is not None and \
                json.loads(saved) == json.loads(self.tokenizer.backend_tokenizer.to_str()):
            return  # built from the same data: nothing to swap
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in assets["tokenizer_files"].items():
                Path(tmp, name).write_text(text)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        scid_map = SCIDMap.from_dict(assets["scid_map"])
        ids = tokenizer.convert_tokens_to_ids(self._scid_vocab(scid_map))
        # The checkpoint's tokenizer always wins: its token ids are what the weights learned.
        self._install(tokenizer, scid_map, ids, model=self.model)
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "attach_tokenizer"):
            dm.attach_tokenizer(tokenizer)

    # -- export -----------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.export_on_fit_end and self.run_dir and self.trainer.is_global_zero:
            self.export_artifacts()

    def hf_dir(self) -> Path:
        return Path(self.run_dir) / STAGE / "hf"

    # export_artifacts can leave stage.json to its caller (cli.export_stage writes it last).
    exports_stage_marker = True

    def export_artifacts(self, out_dir: str | os.PathLike | None = None,
                         mark_complete: bool = True) -> dict:
        """Write the HF folder (``<run_dir>/sft/hf``), metrics and ``stage.json``.

        The folder loads with plain transformers (``finetuning: full``:
        ``AutoModelForCausalLM.from_pretrained(dir)``) or peft (``lora``:
        ``PeftModel.from_pretrained(base, dir)``, where ``base`` is the hub model or, for a
        built backbone, ``dir/base``, resized to ``len(tokenizer)``), and it holds the
        tokenizer (with the SCID tokens) and ``scid_map.json``. Returns the stage info.
        """
        hf = Path(out_dir) if out_dir is not None else self.hf_dir()
        tmp = hf.with_name(hf.name + ".tmp")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        is_peft = hasattr(self.model, "peft_config")
        with _no_hf_progress_bars():  # a bar per small file in the stage's log otherwise
            if is_peft and not self.backbone_cfg.name_or_path:
                # A built base model exists nowhere else: save it next to the adapter.
                base = self.model.get_base_model()
                # Unwrapped weights of the frozen base (peft layers removed) for plain loading.
                self._save_unwrapped_base(base, tmp / "base")
                self.tokenizer.save_pretrained(tmp / "base")
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        self.scid_map.save(tmp)
        info = {
            "format": "align3gr-sft/1",
            "backbone": asdict(self.backbone_cfg),
            "lora": asdict(self.lora_cfg),
            "adapter": is_peft,
            "base": ("base" if is_peft and not self.backbone_cfg.name_or_path
                     else self.backbone_cfg.name_or_path),
            "num_items": self.scid_map.num_items,
            "item_levels": self.scid_map.item_levels,
            "vocab_size": len(self.tokenizer),
            "parameters": count_parameters(self.model),
            "user_scid_refresh": self.user_scid_refresh,
            "decode_prior": self.decode_prior,
        }
        if self.decode_prior and self.prior_counts is not None:
            info["prior_counts"] = self.prior_counts  # what serving decodes with
        atomic_write_json(tmp / SFT_INFO_FILE, info)
        if self.prompts is not None:  # what serving needs without the data (Recommender)
            atomic_write_json(tmp / CATALOG_FILE, self.prompts.catalog())
        if hf.exists():
            import shutil
            shutil.rmtree(hf)
        os.replace(tmp, hf)
        if self.run_dir and out_dir is None:
            summary = {k: info[k] for k in ("adapter", "base", "vocab_size", "parameters")}
            # mark_complete=False: stage.json comes from the caller, after what it adds
            # (cli.export_stage: per-user ranks, timing).
            info = {**info, **self._write_metrics(
                extra={"hf_dir": str(hf.relative_to(self.run_dir)), **summary},
                complete=mark_complete)}
        return info

    @staticmethod
    def _save_unwrapped_base(base, path: Path) -> None:
        """Save the frozen base weights of a peft-wrapped model under their plain HF names."""
        state = {}
        for k, v in base.state_dict().items():
            # Adapter weights and trained copies belong to the adapter folder, not the base.
            if "lora_" in k or ".modules_to_save." in k or "trainable_tokens_delta" in k:
                continue
            for wrapper in (".token_adapter", ".base_layer", ".original_module"):
                k = k.replace(wrapper, "")
            state[k] = v
        base.save_pretrained(path, state_dict=state)

    def _write_metrics(self, extra: dict | None = None, complete: bool = True) -> dict:
        """``sft/metrics.json`` (and, with ``complete``, ``sft/stage.json``) from the latest
        results."""
        out = {"dataset": getattr(self.prompts.dataset, "name", None) if self.prompts else None,
               "num_items": self.scid_map.num_items,
               "num_users": int(len(self._split.users)) if self._split is not None else None}
        for split in ("valid", "test"):
            if split in self.results:
                out[split] = self.results[split]
        if self._fit_start is not None:
            out["seconds"] = round(time.time() - self._fit_start, 1)
        out["protocol"] = {"exclude_history": self.exclude_history, "num_beams": self.num_beams,
                           "ks": self.ks}
        stage_dir = Path(self.run_dir) / STAGE
        previous = {}
        for name in ("metrics.json", "stage.json"):
            if (stage_dir / name).exists():
                previous = {**previous, **json.loads((stage_dir / name).read_text())}
        merged = {**previous, **out, **(extra or {})}
        atomic_write_json(stage_dir / "metrics.json", merged)
        if complete:
            mark_stage_complete(self.run_dir, STAGE, merged)
        return merged

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, hf_dir: str | os.PathLike, trainable: bool = True,
                            **overrides) -> GenerativeRecommender:
        """Rebuild the module from an exported HF folder (e.g. ``<run_dir>/sft/hf``).

        ``overrides`` are constructor arguments (``run_dir``, ``num_beams``, ``lr`` ...).
        Call :meth:`attach_data` before :meth:`build_prompts`.
        """
        hf_dir = Path(hf_dir)
        info = read_json(hf_dir / SFT_INFO_FILE)
        try:
            return cls._from_hf(hf_dir, info, trainable, overrides)
        except (FileNotFoundError, ArtifactError):
            raise
        except Exception as err:  # noqa: BLE001 - safetensors, tokenizers, peft errors
            raise ArtifactError(hf_dir, "the exported SFT model (weights, tokenizer, SCID map)",
                                hf_dir.parent.name if hf_dir.name == "hf" else None,
                                err) from err

    @classmethod
    def _from_hf(cls, hf_dir: Path, info: dict, trainable: bool,
                 overrides: dict) -> GenerativeRecommender:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        backbone = BackboneConfig(**info["backbone"])
        lora = LoraSettings(**info["lora"])
        overrides = {"user_scid_refresh": bool(info.get("user_scid_refresh", False)),
                     "decode_prior": float(info.get("decode_prior", 0.0)), **overrides}
        module = cls(backbone=backbone, lora=lora, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        scid_map = load_scid_map(hf_dir)
        # The attention the sft stage computed with (HF would otherwise pick its default).
        attn = {"attn_implementation": loadable_attn_implementation(backbone.attn_implementation)}
        if info["adapter"]:
            from peft import PeftModel

            base_path = hf_dir / "base" if info["base"] == "base" else info["base"]
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=backbone.torch_dtype,
                                                        **attn)
            if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
                base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model = PeftModel.from_pretrained(base, hf_dir, is_trainable=trainable)
        else:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=backbone.torch_dtype,
                                                         **attn)
            model.requires_grad_(trainable)
        ids = tokenizer.convert_tokens_to_ids(cls._scid_vocab(scid_map))
        module._install(tokenizer, scid_map, ids, model=model)
        if info.get("prior_counts") is not None:
            module.set_prior_counts(info["prior_counts"])
        return module


@contextlib.contextmanager
def _no_hf_progress_bars():
    """transformers' progress bars off for the block (``save_pretrained`` shows one per save)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_generative_recommender(path: str | os.PathLike, **overrides) -> GenerativeRecommender:
    """Load from an HF folder (``.../sft/hf``), a run directory, or a Lightning checkpoint."""
    path = Path(path)
    if path.is_file():
        from lightning_modules.components.artifacts import check_checkpoint

        check_checkpoint(path)
        return GenerativeRecommender.load_from_checkpoint(path, map_location="cpu", **overrides)
    if (path / SFT_INFO_FILE).exists():
        return GenerativeRecommender.from_pretrained_dir(path, **overrides)
    if (path / STAGE / "hf" / SFT_INFO_FILE).exists():
        return GenerativeRecommender.from_pretrained_dir(path / STAGE / "hf", **overrides)
    raise FileNotFoundError(f"{path}: no SFT model here (expected an HF folder with "
                            f"{SFT_INFO_FILE}, a run directory or a checkpoint)")
