"""The quantizer interface and the residual codebooks that every quantizer here builds on.

A quantizer maps vectors ``[N, input_dim]`` to discrete codes ``[N, L]`` (one code per level).
Two implementations share this interface, so a YAML swaps them with one ``class_path`` change:

- :class:`~lightning_modules.components.rqvae.RQVAE`: MLP encoder, residual codebooks trained by
  gradient (codebook + commitment loss, straight-through estimator), MLP decoder.
- :class:`~lightning_modules.components.residual_kmeans.ResidualKMeans`: faiss k-means on the
  residuals, level by level, no gradient training (the TIGER/GRID-style baseline).

Both are built by the tokenizer as ``quantizer(input_dim, output_dim)``, because only the tokenizer
knows the width of the vectors it quantizes and of the features to reconstruct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """What one quantizer forward pass returns.

    Attributes:
        reconstruction: ``[N, output_dim]`` decoded vectors (the quantized input for quantizers
            without a decoder).
        codes: ``[N, L]`` long, code of every level.
        loss: scalar training loss (0 for quantizers that are not trained by gradient).
        losses: named loss terms for logging (``recon``, ``codebook``, ``commitment``, ...).
    """

    reconstruction: Tensor
    codes: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


def faiss_kmeans(x: Tensor, k: int, niter: int = 20, seed: int = 0) -> Tensor:
    """Centroids ``[k, d]`` of ``x`` (``[N, d]``) by faiss k-means (L2).

    With fewer points than clusters, the points themselves are the first centroids and the rest
    are jittered copies: the extra codes start unused (dead) instead of failing, which is what
    small test slices need.
    """
    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    n, d = data.shape
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    if n <= k:
        rng = np.random.default_rng(seed)
        extra = data[rng.integers(0, n, size=k - n)]
        scale = 1e-3 * (float(data.std()) + 1e-6)
        centroids = np.concatenate([data, extra + rng.normal(0, scale, extra.shape)], axis=0)
        return torch.as_tensor(centroids, dtype=x.dtype, device=x.device)
    # min_points_per_centroid=1: small catalogues (1.7k items, 256 codes) are the normal case
    # here, so faiss's "please provide more points" warning would only be noise.
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 16)
    km.train(data)
    return torch.as_tensor(km.centroids, dtype=x.dtype, device=x.device)


def squared_distances(x: Tensor, codebook: Tensor) -> Tensor:
    """``[N, K]`` squared L2 distances between ``x`` ``[N, d]`` and ``codebook`` ``[K, d]``."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.t()
            + codebook.pow(2).sum(-1)).clamp_min(0)


def code_statistics(codes: Tensor, codebook_size: int) -> tuple[float, float]:
    """(utilization, perplexity) of one level's codes ``[N]``.

    Utilization: share of the ``codebook_size`` entries used at least once. Perplexity:
    ``exp(entropy)`` of the code frequencies, i.e. the number of equally used codes that
    would give the same entropy (``codebook_size`` at best).
    """
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=codebook_size).double()
    used = float((counts > 0).sum()) / codebook_size
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return used, float(math.exp(entropy))


class ResidualCodebooks(nn.Module):
    """``L`` codebooks (level ``l``: ``[K_l, dim]``) applied residually.

    Level 0 quantizes the vector, level ``l`` quantizes what levels ``0..l-1`` left over, so the
    sum of the chosen codewords approximates the vector.
    """

    def __init__(self, codebook_sizes: list[int], dim: int) -> None:
        super().__init__()
        if not codebook_sizes or min(codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be positive, got {codebook_sizes}")
        self.codebook_sizes = list(codebook_sizes)
        self.dim = dim
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.randn(k, dim) / math.sqrt(dim)) for k in codebook_sizes])
        # A buffer, so the "already initialised by k-means" state survives checkpoints.
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Assign every level by nearest codeword.

        Args:
            h: ``[N, dim]`` vectors.
        Returns:
            codes ``[N, L]``; residuals ``[N, L, dim]`` (the input of each level, built from
            detached codewords so that gradients reach ``h`` but not earlier codebooks);
            codewords ``[N, L, dim]`` (with gradient to the codebooks).
        """
        residual = h
        codes, residuals, codewords = [], [], []
        for codebook in self.codebooks:
            idx = squared_distances(residual.detach(), codebook.detach()).argmin(dim=1)
            word = codebook[idx]
            codes.append(idx)
            residuals.append(residual)
            codewords.append(word)
            residual = residual - word.detach()
        return torch.stack(codes, 1), torch.stack(residuals, 1), torch.stack(codewords, 1)

    @torch.no_grad()
    def last_level_distances(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Codes ``[N, L]`` and ``[N, K_last]`` squared distances of the last level's residual to
        every last-level codeword (collision resolution reassigns by these)."""
        codes, residuals, _ = self(h)
        return codes, squared_distances(residuals[:, -1], self.codebooks[-1])

    @torch.no_grad()
    def kmeans_init(self, h: Tensor, niter: int = 20, seed: int = 0) -> None:
        """Set level ``l``'s codebook to the faiss k-means centroids of level ``l``'s residuals."""
        residual = h.detach()
        for level, codebook in enumerate(self.codebooks):
            centroids = faiss_kmeans(residual, codebook.shape[0], niter=niter, seed=seed + level)
            codebook.data.copy_(centroids)
            idx = squared_distances(residual, codebook).argmin(dim=1)
            residual = residual - codebook[idx]
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, codes: Tensor, residuals: Tensor, decay: float) -> None:
        """Online k-means step: each codeword moves to the exponential moving average of the
        residuals assigned to it (``codes`` ``[N, L]``, ``residuals`` ``[N, L, dim]``).

        Unlike a gradient step on the codebook loss, this moves a codeword all the way to its
        cluster's mean at the rate ``1 - decay``, so the codebooks keep up with an encoder that
        is still changing (otherwise its drift empties most codes within a few steps).
        """
        for level, codebook in enumerate(self.codebooks):
            k = codebook.shape[0]
            counts = torch.bincount(codes[:, level], minlength=k).to(codebook.dtype)
            sums = torch.zeros_like(codebook).index_add_(0, codes[:, level],
                                                         residuals[:, level].to(codebook.dtype))
            used = counts > 0
            # Codes without members keep their place (dead-code resets deal with them).
            codebook.data[used] = decay * codebook.data[used] + (1 - decay) * (
                sums[used] / counts[used, None])

    @torch.no_grad()
    def reset_codes(self, level: int, dead: Tensor, residuals: Tensor) -> int:
        """Move the ``dead`` codewords (bool ``[K_l]``) of ``level`` onto random residuals
        ``[M, dim]`` of that level, so they get used again. Returns the number moved."""
        n_dead = int(dead.sum())
        if n_dead == 0 or residuals.shape[0] == 0:
            return 0
        if residuals.shape[0] >= n_dead:
            pick = torch.randperm(residuals.shape[0], device=residuals.device)[:n_dead]
        else:
            pick = torch.randint(0, residuals.shape[0], (n_dead,), device=residuals.device)
        # Tiny jitter: two codes moved onto the same residual would otherwise tie forever.
        new = residuals[pick] + 1e-4 * residuals.std() * torch.randn_like(residuals[pick])
        self.codebooks[level].data[dead] = new.to(self.codebooks[level].dtype)
        return n_dead


class Quantizer(nn.Module):
    """Interface: vectors ``[N, input_dim]`` → codes ``[N, L]``.

    Subclasses set :attr:`trainable` (whether gradient steps train them) and implement
    :meth:`initialize`, :meth:`forward` and :meth:`encode_with_distances`.

    Args:
        input_dim: width of the vectors to quantize.
        output_dim: width of the reconstruction target (defaults to ``input_dim``).
        codebook_sizes: codes per level, e.g. ``[256, 256, 256]``.
    """

    trainable: bool = True

    def __init__(self, input_dim: int, output_dim: int | None = None,
                 codebook_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim or input_dim
        self._codebook_sizes = list(codebook_sizes or [256, 256, 256])
        # A JSON-able description for fingerprints and logs (subclasses add their settings).
        self.config: dict = {"class": type(self).__name__, "codebook_sizes": self._codebook_sizes}

    @property
    def codebook_sizes(self) -> list[int]:
        return list(self._codebook_sizes)

    @property
    def num_levels(self) -> int:
        return len(self._codebook_sizes)

    @property
    def initialized(self) -> bool:
        raise NotImplementedError

    @property
    def needs_initialization(self) -> bool:
        """Whether the trainer should call :meth:`initialize` now (a warm-up may delay it)."""
        return not self.initialized

    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation on all vectors ``[N, input_dim]`` (k-means)."""
        raise NotImplementedError

    def forward(self, x: Tensor, target: Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` ``[N, input_dim]``; losses against ``target`` ``[N, output_dim]``
        (default ``x``)."""
        raise NotImplementedError

    def encode_with_distances(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Codes ``[N, L]`` and the last level's squared distances ``[N, K_last]``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Codes ``[N, L]`` (long) of ``x`` ``[N, input_dim]``."""
        return self.encode_with_distances(x)[0]

    def fit(self, x: Tensor, target: Tensor | None = None, epochs: int = 100,
            batch_size: int = 1024, lr: float = 1e-3) -> Quantizer:
        """Standalone fit on ``x`` ``[N, input_dim]``: initialise, then (if trainable) Adam
        steps on the quantizer's own loss. The tokenizer stage trains through Lightning instead;
        this is for benchmarks, notebooks and tests."""
        self.initialize(x)
        if not self.trainable:
            return self
        target = x if target is None else target
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.train()
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0]).split(batch_size):
                loss = self(x[idx], target[idx]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.eval()
        return self
