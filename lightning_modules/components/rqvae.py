"""RQ-VAE: MLP encoder → residual codebooks → MLP decoder (the paper's quantizer).

Loss per batch (all squared errors summed over dimensions, averaged over the batch)::

    recon      = |decoder(q) - target|^2            q = h + sg(sum_l c_l - h)  (straight-through)
    codebook   = sum_l |sg(r_l) - c_l|^2            moves codewords towards the residuals
    commitment = sum_l |r_l - sg(c_l)|^2            keeps the encoder close to its codewords
    loss       = recon + codebook + beta * commitment + diversity_weight * diversity

``h`` is the encoder output, ``r_l`` the residual entering level ``l`` and ``c_l`` its nearest
codeword. Codebooks start from faiss k-means of the encoded data (:meth:`RQVAE.initialize`)
after ``warmup_steps`` steps as a plain autoencoder, and codewords unused for
``dead_code_steps`` training steps are moved onto random current residuals; both keep codebook
utilization high on small catalogues.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_modules.components.quantizer import (
    Quantizer,
    QuantizerOutput,
    ResidualCodebooks,
    squared_distances,
)


def mlp(dims: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers ``dims[0] → ... → dims[-1]`` with ReLU (and dropout) between them."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RQVAE(Quantizer):
    """Residual-quantized variational autoencoder.

    Args:
        input_dim: width of the input vectors ``[N, input_dim]`` (given by the tokenizer).
        output_dim: width of the reconstruction target (default ``input_dim``).
        codebook_sizes: codes per level (paper: ``[256, 256, 256]``).
        code_dim: codeword width (paper: 32).
        hidden_dims: encoder hidden widths; the decoder mirrors them.
        commitment: beta of the commitment term (paper: 0.25).
        diversity_weight: weight of the optional diversity loss (0 = off): per level,
            ``1 - H(mean soft assignment) / log K``, which pushes the batch to spread over codes.
        dead_code_steps: every this many training steps, codewords unused since the last check
            move onto random residuals (0 = never).
        kmeans_iters: faiss k-means iterations of the codebook initialisation.
        dropout: dropout between encoder/decoder layers.
        ema_decay: 0 = codebooks learn from the codebook loss (the paper); > 0 = codebooks are
            exponential moving averages of their assigned residuals (online k-means, VQ-VAE-2
            style), which follows a fast-moving encoder more closely.
        warmup_steps: training steps as a plain autoencoder (no codebooks) before the k-means
            initialisation (0 = initialise at once).
        seed: seed of the k-means initialisation.
    """

    trainable = True

    def __init__(self, input_dim: int, output_dim: int | None = None,
                 codebook_sizes: list[int] | None = None, code_dim: int = 32,
                 hidden_dims: list[int] | None = None, commitment: float = 0.25,
                 diversity_weight: float = 0.0, dead_code_steps: int = 20,
                 kmeans_iters: int = 20, dropout: float = 0.0, ema_decay: float = 0.0,
                 warmup_steps: int = 50, seed: int = 0) -> None:
        super().__init__(input_dim, output_dim, codebook_sizes)
        hidden = list(hidden_dims if hidden_dims is not None else [128, 64])
        self.encoder = mlp([input_dim, *hidden, code_dim], dropout)
        self.decoder = mlp([code_dim, *reversed(hidden), self.output_dim], dropout)
        self.codebooks = ResidualCodebooks(self.codebook_sizes, code_dim)
        self.ema_decay = ema_decay
        if ema_decay > 0:
            self.codebooks.requires_grad_(False)  # moved by ema_update, not by the optimizer
        self.commitment = commitment
        self.diversity_weight = diversity_weight
        self.dead_code_steps = dead_code_steps
        self.kmeans_iters = kmeans_iters
        self.warmup_steps = warmup_steps
        self.seed = seed
        # Autoencoder steps taken before the codebooks exist (in checkpoints, so resumes agree).
        self.register_buffer("warmup_progress", torch.tensor(0))
        # Usage since the last dead-code check; not part of the checkpoint.
        for level, k in enumerate(self.codebook_sizes):
            self.register_buffer(f"_usage_{level}", torch.zeros(k), persistent=False)
        self._steps = 0
        self.config.update(code_dim=code_dim, hidden_dims=hidden, commitment=commitment,
                           diversity_weight=diversity_weight, dead_code_steps=dead_code_steps,
                           kmeans_iters=kmeans_iters, dropout=dropout, ema_decay=ema_decay,
                           warmup_steps=warmup_steps, seed=seed)

    @property
    def initialized(self) -> bool:
        return bool(self.codebooks.initialized)

    @property
    def needs_initialization(self) -> bool:
        return not self.initialized and int(self.warmup_progress) >= self.warmup_steps

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Codebooks := faiss k-means of the encoded ``x`` ``[N, input_dim]``, level by level."""
        was_training = self.training
        self.eval()
        self.codebooks.kmeans_init(self.encoder(x), niter=self.kmeans_iters, seed=self.seed)
        self.train(was_training)

    def forward(self, x: Tensor, target: Tensor | None = None) -> QuantizerOutput:
        target = x if target is None else target
        h = self.encoder(x)
        if not self.initialized and self.training and int(self.warmup_progress) < self.warmup_steps:
            return self._autoencoder_step(h, target)
        if not self.initialized:
            # Fallback when nobody initialised on all data: k-means on the first batch.
            self.codebooks.kmeans_init(h.detach(), niter=self.kmeans_iters, seed=self.seed)
        codes, residuals, codewords = self.codebooks(h)
        quantized = h + (codewords.sum(1) - h).detach()
        reconstruction = self.decoder(quantized)

        recon = (reconstruction - target).pow(2).sum(-1).mean()
        codebook = (residuals.detach() - codewords).pow(2).sum(-1).sum(-1).mean()
        commitment = (residuals - codewords.detach()).pow(2).sum(-1).sum(-1).mean()
        loss = recon + codebook + self.commitment * commitment
        losses = {"recon": recon.detach(), "codebook": codebook.detach(),
                  "commitment": commitment.detach()}
        if self.diversity_weight > 0:
            diversity = self._diversity(residuals)
            loss = loss + self.diversity_weight * diversity
            losses["diversity"] = diversity.detach()
        if self.training:
            if self.ema_decay > 0:
                self.codebooks.ema_update(codes, residuals.detach(), self.ema_decay)
            self._track_usage(codes, residuals)
        return QuantizerOutput(reconstruction, codes, loss, losses)

    def _autoencoder_step(self, h: Tensor, target: Tensor) -> QuantizerOutput:
        """Warm-up: train encoder and decoder without codebooks (codes are all 0 meanwhile).

        A random decoder sends large gradients into the encoder; codebooks fitted before that
        settles are left behind within a few steps (most codes empty). Fitting them after a short
        warm-up keeps the k-means initialisation meaningful.
        """
        self.warmup_progress += 1
        reconstruction = self.decoder(h)
        recon = (reconstruction - target).pow(2).sum(-1).mean()
        codes = torch.zeros(len(h), self.num_levels, dtype=torch.long, device=h.device)
        return QuantizerOutput(reconstruction, codes, recon, {"recon": recon.detach()})

    def _diversity(self, residuals: Tensor) -> Tensor:
        """Mean over levels of ``1 - H(batch-mean soft assignment) / log K`` (0 = uniform)."""
        terms = []
        for level, codebook in enumerate(self.codebooks.codebooks):
            dist = squared_distances(residuals[:, level], codebook)
            # Distances scaled by their row mean: a temperature that follows the residual scale.
            p = torch.softmax(-dist / dist.detach().mean(1, keepdim=True).clamp_min(1e-8), dim=1)
            mean_p = p.mean(0)
            entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
            terms.append(1 - entropy / math.log(codebook.shape[0]))
        return torch.stack(terms).mean()

    @torch.no_grad()
    def _track_usage(self, codes: Tensor, residuals: Tensor) -> None:
        if self.dead_code_steps <= 0:
            return
        for level, k in enumerate(self.codebook_sizes):
            usage = getattr(self, f"_usage_{level}")
            usage += torch.bincount(codes[:, level], minlength=k).to(usage)
        self._steps += 1
        if self._steps % self.dead_code_steps:
            return
        for level in range(self.num_levels):
            usage = getattr(self, f"_usage_{level}")
            self.codebooks.reset_codes(level, usage == 0, residuals[:, level].detach())
            usage.zero_()

    @torch.no_grad()
    def encode_with_distances(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.codebooks.last_level_distances(self.encoder(x))
