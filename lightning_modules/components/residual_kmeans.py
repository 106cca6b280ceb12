"""Residual k-means: the gradient-free baseline quantizer (TIGER/GRID style).

Level 0 clusters the vectors with faiss k-means, level ``l`` clusters what the earlier levels'
centroids left over. There is no encoder, decoder or training: :meth:`ResidualKMeans.initialize`
(alias :meth:`fit`) does all the work, so the tokenizer refits it on the current fused vectors
whenever it needs codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.components.quantizer import Quantizer, QuantizerOutput, ResidualCodebooks


class ResidualKMeans(Quantizer):
    """Residual k-means over the input vectors themselves.

    Args:
        input_dim: width of the vectors ``[N, input_dim]`` (given by the tokenizer).
        output_dim: accepted for interface compatibility; there is no decoder.
        codebook_sizes: clusters per level, e.g. ``[256, 256, 256]``.
        kmeans_iters: faiss k-means iterations per level.
        normalize: L2-normalise vectors before clustering (cosine geometry).
        seed: k-means seed.
    """

    trainable = False

    def __init__(self, input_dim: int, output_dim: int | None = None,
                 codebook_sizes: list[int] | None = None, kmeans_iters: int = 25,
                 normalize: bool = False, seed: int = 0) -> None:
        super().__init__(input_dim, output_dim, codebook_sizes)
        self.codebooks = ResidualCodebooks(self.codebook_sizes, input_dim)
        self.codebooks.requires_grad_(False)
        self.kmeans_iters = kmeans_iters
        self.normalize = normalize
        self.seed = seed
        self.config.update(kmeans_iters=kmeans_iters, normalize=normalize, seed=seed)

    def _prepare(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, dim=-1) if self.normalize else x

    @property
    def initialized(self) -> bool:
        return bool(self.codebooks.initialized)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Fit every level's centroids on ``x`` ``[N, input_dim]``."""
        self.codebooks.kmeans_init(self._prepare(x), niter=self.kmeans_iters, seed=self.seed)

    @torch.no_grad()
    def forward(self, x: Tensor, target: Tensor | None = None) -> QuantizerOutput:
        """Codes and the sum of chosen centroids ``[N, input_dim]``; the loss is a constant 0."""
        codes, _, codewords = self.codebooks(self._prepare(x))
        return QuantizerOutput(codewords.sum(1), codes, x.new_zeros(()), {})

    @torch.no_grad()
    def encode_with_distances(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.codebooks.last_level_distances(self._prepare(x))
