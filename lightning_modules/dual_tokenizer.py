"""Stage "tokenizer": dual semantic-collaborative IDs (SCIDs) for items AND users (Align3GR §1).

Per side (items, users)::

    x = [text embedding | sasrec embedding]           (TokenizerDataModule, [N, D])
    z = fusion_side(x)                                 SC encoder: MLP, [N, fused_dim]
    codes, x_hat = quantizer_side(z)                   RQ-VAE: encoder → L residual codebooks
                                                       → decoder reconstructing x
    L = alpha * L_U2I(z_user, z_pos_item, z_neg_items) + gamma * (L_itemRQ + L_userRQ)

The U2I term is a sampled softmax of a user's fused vector over its training positive and 60
sampled negatives. :class:`~callbacks.loss_schedule.TwoPhaseLossSchedule` drives the paper's
schedule: phase 1 (alpha=1, gamma=0) aligns users with items; phase 2 (alpha=0.1, gamma=1) learns
the codes. The codebooks are initialised by faiss k-means on all encoded entities when the
quantization loss is first switched on.

After fit, :meth:`DualTokenizer.export_artifacts` encodes every entity, resolves collisions and
writes ``<run_dir>/tokenizer/scid_map.json`` and ``codebook_stats.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from lightning_modules.components.artifacts import (
    USER_PREFIX_CODES_FILE,
    atomic_torch_save,
    atomic_write_json,
    fingerprint,
    stage_dir,
)
from lightning_modules.components.collisions import CollisionResolver, collision_rate
from lightning_modules.components.quantizer import Quantizer, code_statistics
from lightning_modules.components.rqvae import RQVAE, mlp
from lightning_modules.components.scid_map import ITEM_PREFIXES, USER_PREFIXES, SCIDMap
from lightning_modules.components.threads import pinned_threads
from lightning_modules.components.u2i_loss import U2IAlignmentLoss

log = logging.getLogger(__name__)

STAGE = "tokenizer"
STATS_FILE = "codebook_stats.json"
SIDES = ("items", "users")

# Built as quantizer(input_dim, output_dim): only the tokenizer knows both widths. In YAML it is
# a class_path + init_args without those two arguments.
QuantizerFactory = Callable[[int, int], Quantizer]


def _key(side: str) -> str:
    """ModuleDict key of a side: 'item' / 'user' ('items' would shadow ModuleDict.items)."""
    return side[:-1]


class DualTokenizer(L.LightningModule):
    """SC fusion + quantizer per side, U2I alignment, unique SCIDs for items and users.

    Args:
        quantizer: how to build a quantizer, called as ``quantizer(fused_dim, input_dim)``;
            None = :class:`~lightning_modules.components.rqvae.RQVAE` with its defaults. Swap
            to :class:`~lightning_modules.components.residual_kmeans.ResidualKMeans` in YAML.
        collisions: collision resolution of the final IDs (None = Sinkhorn on the last level,
            plus a de-duplication level only if collisions remain).
        fused_dim: width of the SC encoder's output (the quantizer's input).
        fusion_hidden: hidden widths of the SC fusion MLP (``[]`` = one linear layer).
        share_quantizer: one quantizer for users and items (True) or one per side (False).
        tokenize_users: also produce user SCIDs (False = item-only SCIDs, the ablation).
        u2i: use the U2I alignment loss (False = the ablation).
        temperature: softmax temperature of the U2I loss (cosine similarities).
        alpha: weight of the U2I loss (the schedule callback overrides it per epoch).
        gamma: weight of the quantization losses (likewise).
        lr: Adam learning rate. weight_decay: Adam weight decay.
        run_dir: run directory; artifacts go to ``<run_dir>/tokenizer``.
        item_input_dim, user_input_dim: input widths, filled in from the data at setup (leave
            null; they are stored so checkpoints reload without the data).
        compute_threads: torch and faiss threads while the stage fits, evaluates and exports
            (restored after): float sums split over another number of threads round
            differently and the SCIDs drift apart, so a fixed number makes them independent
            of the machine's setting. ``null`` = the process setting (not reproducible across
            thread counts).
    """

    reads_stages = ()  # (its DataModule reads the sasrec stage)

    stage_name = STAGE  # the run-directory folder the CLI and the pipeline use

    # 2: the users' refreshed codes in the SCID map (SCIDMap.user_refreshed_codes); 3: and
    # their codes before every training target (USER_PREFIX_CODES_FILE).
    artifacts_version = 3
    # A killed tokenizer stage starts over (it is the shortest stage): part of the quantizers'
    # training state (dead-code counters, the k-means initialisation) is not in a checkpoint.
    resumable = False

    def __init__(self, quantizer: QuantizerFactory | None = None,
                 collisions: CollisionResolver | None = None, fused_dim: int = 64,
                 fusion_hidden: list[int] | None = None, share_quantizer: bool = False,
                 tokenize_users: bool = True, u2i: bool = True, temperature: float = 0.1,
                 alpha: float = 0.1, gamma: float = 1.0, lr: float = 1e-3,
                 weight_decay: float = 0.0, run_dir: str | None = None,
                 item_input_dim: int | None = None, user_input_dim: int | None = None,
                 compute_threads: int | None = 1) -> None:
        super().__init__()
        if compute_threads is not None and compute_threads < 1:
            raise ValueError(f"model.compute_threads must be >= 1 or null, got {compute_threads}")
        self.save_hyperparameters()
        self.compute_threads = compute_threads
        self._threads = None
        self.quantizer_factory = quantizer or RQVAE
        self.collisions = collisions or CollisionResolver()
        self.fused_dim = fused_dim
        self.fusion_hidden = list(fusion_hidden if fusion_hidden is not None else [256])
        self.share_quantizer = share_quantizer
        self.tokenize_users = tokenize_users
        self.u2i = u2i
        self.alpha = alpha
        self.gamma = gamma
        self.lr = lr
        self.weight_decay = weight_decay
        self.run_dir = run_dir
        self.u2i_loss = U2IAlignmentLoss(temperature)
        self.data_info: dict = {}
        self.user_x_refreshed: dict[str, Tensor] = {}  # later splits' user inputs (export only)
        self.user_x_prefix: Tensor | None = None  # inputs before each training target (export)
        self.user_prefix_offsets: Tensor | None = None
        self.fusion: nn.ModuleDict | None = None
        self.quantizers: nn.ModuleDict | None = None
        if item_input_dim is not None and user_input_dim is not None:
            self._build(item_input_dim, user_input_dim)

    # -- construction -----------------------------------------------------------------------
    def _build(self, item_dim: int, user_dim: int) -> None:
        """Create the networks once the input widths are known."""
        # The closing LayerNorm fixes the fused vectors' scale: the cosine U2I loss leaves it
        # free, and a tiny scale makes the quantizer's latents one tight ball that the first
        # optimizer steps push onto a handful of codes.
        self.fusion = nn.ModuleDict({
            _key(side): nn.Sequential(mlp([dim, *self.fusion_hidden, self.fused_dim]),
                                      nn.LayerNorm(self.fused_dim, elementwise_affine=False))
            for side, dim in (("items", item_dim), ("users", user_dim))})
        if self.share_quantizer:
            if item_dim != user_dim:
                raise ValueError(f"share_quantizer needs equal item and user input widths "
                                 f"(reconstruction targets), got {item_dim} and {user_dim}")
            self.quantizers = nn.ModuleDict({"shared": self.quantizer_factory(self.fused_dim,
                                                                              item_dim)})
        else:
            sides = [("items", item_dim)] + ([("users", user_dim)] if self.tokenize_users else [])
            self.quantizers = nn.ModuleDict({_key(side): self.quantizer_factory(self.fused_dim, dim)
                                             for side, dim in sides})
        self.hparams["item_input_dim"] = item_dim
        self.hparams["user_input_dim"] = user_dim

    def attach_data(self, item_x: Tensor, user_x: Tensor, data_info: dict | None = None,
                    user_x_refreshed: dict[str, Tensor] | None = None,
                    user_x_prefix: Tensor | None = None,
                    user_prefix_offsets: Tensor | None = None) -> None:
        """Give the module every entity's input vectors (``[num_items, D_i]``,
        ``[num_users, D_u]``). The Trainer does this in :meth:`setup` from the DataModule.
        ``user_x_refreshed``: the users' inputs from the later splits' histories
        (``{"test": [num_users, D_u], "predict": ...}``); the export encodes them into
        refreshed user SCIDs. ``user_x_prefix`` ``[P, D_u]`` with ``user_prefix_offsets``
        ``[num_users + 1]``: the users' inputs before every training target; the export
        encodes them into causal user codes (:data:`USER_PREFIX_CODES_FILE`). Neither takes
        part in training."""
        if self.fusion is None:
            self._build(item_x.shape[1], user_x.shape[1])
        expected = (self.hparams["item_input_dim"], self.hparams["user_input_dim"])
        if (item_x.shape[1], user_x.shape[1]) != expected:
            raise ValueError(f"input widths (items {item_x.shape[1]}, users {user_x.shape[1]}) "
                             f"differ from the model's {expected}: the features changed since "
                             "this model was built")
        # Non-persistent buffers: they follow the module's device but stay out of checkpoints.
        self.register_buffer("item_x", item_x.to(self.device), persistent=False)
        self.register_buffer("user_x", user_x.to(self.device), persistent=False)
        self.user_x_refreshed = {}
        for split, x in (user_x_refreshed or {}).items():
            if tuple(x.shape) != tuple(user_x.shape):
                raise ValueError(f"user_x_refreshed[{split!r}] has shape {tuple(x.shape)}, "
                                 f"expected the user inputs' {tuple(user_x.shape)}")
            self.user_x_refreshed[split] = x.to(self.device)
        self.user_x_prefix = self.user_prefix_offsets = None
        if user_x_prefix is not None:
            if user_prefix_offsets is None or user_x_prefix.shape[1] != user_x.shape[1] or \
                    len(user_prefix_offsets) != len(user_x) + 1 or \
                    int(user_prefix_offsets[-1]) != len(user_x_prefix):
                raise ValueError(f"user_x_prefix {tuple(user_x_prefix.shape)} does not fit "
                                 f"the user inputs {tuple(user_x.shape)} and its offsets")
            self.user_x_prefix = user_x_prefix.to(self.device)
            self.user_prefix_offsets = user_prefix_offsets.long().cpu()
        self.data_info = dict(data_info or {})

    def setup(self, stage: str) -> None:
        # Fit/validate/test compute at `compute_threads` threads (restored in teardown), so the
        # SCIDs are the same whatever the process's thread setting.
        if self._threads is None:
            self._threads = pinned_threads(self.compute_threads)
            self._threads.__enter__()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "tokenizer_inputs"):
            raise TypeError("DualTokenizer needs a datamodule with tokenizer_inputs() "
                            "(datamodules.tokenizer_data.TokenizerDataModule)")
        self.attach_data(**datamodule.tokenizer_inputs())
        # Phase 1 trains the fusion and leaves the quantizers without gradients, which plain
        # DDP (`--trainer.strategy ddp`) refuses; the strategy wraps the model after setup().
        ddp_kwargs = getattr(getattr(self.trainer, "strategy", None), "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and "find_unused_parameters" not in ddp_kwargs:
            ddp_kwargs["find_unused_parameters"] = True

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    # -- pieces -----------------------------------------------------------------------------
    @property
    def sides(self) -> tuple[str, ...]:
        """The sides that get SCIDs."""
        return SIDES if self.tokenize_users else ("items",)

    def quantizer_for(self, side: str) -> Quantizer:
        return self.quantizers["shared" if self.share_quantizer else _key(side)]

    def inputs(self, side: str, ids: Tensor | None = None) -> Tensor:
        """Input vectors ``[n, D]`` of ``ids`` (all entities when None)."""
        x = self.item_x if side == "items" else self.user_x
        return x if ids is None else x[ids]

    def fuse(self, side: str, ids: Tensor | None = None) -> Tensor:
        """SC-fused vectors ``[n, fused_dim]`` of ``ids`` (all entities when None)."""
        return self.fusion[_key(side)](self.inputs(side, ids))

    def _fit_data(self, quantizer: Quantizer) -> Tensor:
        """Fused vectors of every entity this quantizer codes (both sides when shared)."""
        sides = [s for s in self.sides if self.quantizer_for(s) is quantizer]
        return torch.cat([self.fuse(s) for s in sides])

    @torch.no_grad()
    def initialize_quantizers(self, force: bool = False, refit: bool = False) -> None:
        """k-means initialisation on all fused entity vectors, for quantizers that ask for it
        (``force``: for every uninitialised one, warm-up or not); ``refit`` also refits
        quantizers without gradient training (residual k-means follows the fusion as it moves)."""
        was_training = self.training
        self.eval()
        for quantizer in self.quantizers.values():
            if quantizer.needs_initialization or (force and not quantizer.initialized) or \
                    (refit and not quantizer.trainable):
                quantizer.initialize(self._fit_data(quantizer))
        self.train(was_training)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        users, positives, negatives = batch["users"], batch["positives"], batch["negatives"]
        b = len(users)
        # Each entity is fused once per step, however often it appears among the pairs; when
        # the samples outnumber the catalogue (ML-100K: 2048 x 61 vs 1682), fusing all items
        # is cheaper than finding the distinct ones.
        sampled = torch.cat([positives, negatives.flatten()])
        if len(sampled) >= len(self.item_x):
            item_ids, item_inv = torch.arange(len(self.item_x), device=self.device), sampled
        else:
            item_ids, item_inv = torch.unique(sampled, return_inverse=True)
        user_ids, user_inv = torch.unique(users, return_inverse=True)
        fused = {"items": self.fuse("items", item_ids), "users": self.fuse("users", user_ids)}
        ids = {"items": item_ids, "users": user_ids}
        terms: list[Tensor] = []
        if self.u2i and self.alpha > 0:
            u2i = self.u2i_loss(fused["users"][user_inv], fused["items"], item_inv[:b],
                                item_inv[b:].view(b, -1), batch.get("negative_mask"))
            terms.append(self.alpha * u2i)
            self.log("train/u2i", u2i, prog_bar=True, batch_size=b)
        trains_codes = any(q.trainable for q in self.quantizers.values())
        if self.gamma > 0 and trains_codes:
            self.initialize_quantizers()
            for side in self.sides:
                out = self.quantizer_for(side)(fused[side], target=self.inputs(side, ids[side]))
                terms.append(self.gamma * out.loss)
                for name, value in out.losses.items():
                    self.log(f"train/{side}/{name}", value, batch_size=b)
        self.log_dict({"train/alpha": float(self.alpha), "train/gamma": float(self.gamma)},
                      batch_size=b)
        if not terms:
            return None  # nothing to learn in this phase (e.g. u2i off and gamma=0)
        loss = torch.stack(terms).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Dead-code resets and EMA updates write codebooks outside the optimizer, from each
        # rank's own batch: rank 0's copy becomes everyone's, so DDP replicas stay identical.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for quantizer in self.quantizers.values():
                for codebook in quantizer.codebooks.parameters():
                    torch.distributed.broadcast(codebook.data, src=0)

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_side(self, side: str, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw codes ``[n, L]`` (before collision resolution) and last-level distances."""
        return self.quantizer_for(side).encode_with_distances(self.fuse(side, ids))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not all(q.initialized or not q.trainable for q in self.quantizers.values()):
            return  # phase 1: codebooks not initialised yet, their statistics mean nothing
        self.initialize_quantizers(refit=True)
        for side in self.sides:
            codes, _ = self.encode_side(side, batch[side])
            quantizer = self.quantizer_for(side)
            metrics = {f"val/{side}/collision_rate": collision_rate(codes)}
            for level, size in enumerate(quantizer.codebook_sizes):
                used, perplexity = code_statistics(codes[:, level], size)
                metrics[f"val/{side}/utilization_l{level}"] = used
                metrics[f"val/{side}/perplexity_l{level}"] = perplexity
            if quantizer.trainable:
                out = quantizer(self.fuse(side, batch[side]),
                                target=self.inputs(side, batch[side]))
                metrics[f"val/{side}/recon"] = float(out.losses["recon"])
            self.log_dict(metrics, batch_size=len(codes))

    def _refreshed_codes(self, user_x: Tensor, levels: int) -> Tensor:
        """Codes ``[num_users, levels]`` of the users re-encoded from other inputs, their last
        level re-assigned like the training-history codes' (Sinkhorn). No de-duplication: a
        prompt's user SCID need not be unique, and a de-duplication level of the training
        codes is 0 here (most users' value there)."""
        quantizer = self.quantizer_for("users")
        codes, distances = quantizer.encode_with_distances(self.fusion[_key("users")](user_x))
        resolved = self.collisions.resolve(codes, quantizer.codebook_sizes, distances).codes
        pad = resolved.new_zeros(len(resolved), levels - codes.shape[1])
        return torch.cat([resolved[:, :codes.shape[1]], pad], dim=1)

    def _prefix_codes(self, levels: int) -> Tensor:
        """Codes ``[P, levels]`` of the users' inputs before every training target: the
        quantizer's nearest codes, without collision handling (many prefixes of one user share
        a code, and balancing them against each other would only move them off their nearest
        codewords); a de-duplication level is 0."""
        quantizer = self.quantizer_for("users")
        fuse = self.fusion[_key("users")]
        parts = [quantizer.encode(fuse(x)).cpu().long()
                 for x in self.user_x_prefix.split(65536)]
        codes = torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.long)
        pad = codes.new_zeros(len(codes), levels - codes.shape[1])
        return torch.cat([codes, pad], dim=1)

    # -- artifacts --------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-able description of the model's settings (for the fingerprint)."""
        skip = {"quantizer", "collisions", "run_dir"}
        hp = {k: v for k, v in self.hparams.items() if k not in skip and not k.startswith("_")}
        return {**hp, "quantizer": next(iter(self.quantizers.values())).config,
                "collisions": self.collisions.config()}

    def teardown(self, stage: str) -> None:
        if self._threads is not None:
            self._threads.__exit__(None, None, None)
            self._threads = None

    @torch.no_grad()
    def export_artifacts(self) -> dict:
        with pinned_threads(self.compute_threads):
            return self._export_artifacts()

    def _export_artifacts(self) -> dict:
        """Final unique SCIDs of all items (and users) → ``<run_dir>/tokenizer/``.

        Writes ``scid_map.json`` (:class:`SCIDMap`) and ``codebook_stats.json``. Returns the
        ``stages.tokenizer`` entry of ``metrics.json`` without ``seconds``:
        ``{"items": {"collision_rate", "utilization": [per level]}, "users": {...}}``.
        """
        if self.run_dir is None:
            raise ValueError("DualTokenizer.run_dir is not set; nowhere to write the SCID map")
        if not hasattr(self, "item_x"):
            raise RuntimeError("no entity inputs attached: fit with a TokenizerDataModule or "
                               "call attach_data(...) before export_artifacts()")
        self.initialize_quantizers(force=True, refit=True)
        was_training = self.training
        self.eval()
        resolved, stats, metrics = {}, {}, {}
        for side in self.sides:
            codes, distances = self.encode_side(side)
            sizes = self.quantizer_for(side).codebook_sizes
            res = self.collisions.resolve(codes, sizes, distances)
            levels = [dict(zip(("utilization", "perplexity"), code_statistics(res.codes[:, lv], k)),
                           codebook_size=k) for lv, k in enumerate(res.codebook_sizes)]
            resolved[side] = res
            stats[side] = {"levels": levels, **res.statistics()}
            metrics[side] = {"collision_rate": res.collision_rate_after,
                             "utilization": [lv["utilization"] for lv in levels]}
            log.info("%s: collisions %.4f -> %.4f, utilization %s", side,
                     res.collision_rate_before, res.collision_rate_after,
                     [round(u, 3) for u in metrics[side]["utilization"]])
        refreshed = {}
        if "users" in resolved:
            for split, x in self.user_x_refreshed.items():
                refreshed[split] = self._refreshed_codes(x, resolved["users"].codes.shape[1])
        prefix_codes = None
        if "users" in resolved and self.user_x_prefix is not None:
            levels = resolved["users"].codes.shape[1]
            prefix_codes = self._prefix_codes(levels)
        self.train(was_training)
        items, users = resolved["items"], resolved.get("users")
        scid_map = SCIDMap(
            item_codes=items.codes, item_codebook_sizes=items.codebook_sizes,
            user_codes=None if users is None else users.codes,
            user_codebook_sizes=None if users is None else users.codebook_sizes,
            item_prefixes=ITEM_PREFIXES, user_prefixes=USER_PREFIXES,
            fingerprint=fingerprint(self.config(), self.data_info),
            meta={"model": self.config(), "data": self.data_info, "statistics": stats},
            user_refreshed_codes=refreshed)
        out_dir = Path(stage_dir(self.run_dir, self.stage_name))
        scid_map.save(out_dir)
        if prefix_codes is not None:
            atomic_torch_save({"codes": prefix_codes.cpu(), "offsets": self.user_prefix_offsets},
                              out_dir / USER_PREFIX_CODES_FILE)
        else:  # no stale file from an earlier export of this stage
            (out_dir / USER_PREFIX_CODES_FILE).unlink(missing_ok=True)
        atomic_write_json(out_dir / STATS_FILE, stats)
        return metrics
