"""Quantizers: residual arithmetic, k-means initialisation, RQ-VAE training, shared interface,
and the U2I loss."""

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.quantizer import (
    ResidualCodebooks,
    code_statistics,
    faiss_kmeans,
)
from lightning_modules.components.residual_kmeans import ResidualKMeans
from lightning_modules.components.rqvae import RQVAE
from lightning_modules.components.u2i_loss import U2IAlignmentLoss


@pytest.fixture
def clustered() -> torch.Tensor:
    """600 points in 16-d around 12 well separated centres."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=g) * 4
    return centres[torch.arange(600) % 12] + 0.3 * torch.randn(600, 16, generator=g)


def test_residuals_sum_back_and_codes_are_in_range():
    torch.manual_seed(0)
    books = ResidualCodebooks([5, 7, 3], dim=8)
    h = torch.randn(50, 8)
    codes, residuals, words = books(h)
    assert codes.shape == (50, 3) and codes.dtype == torch.long
    for level, k in enumerate([5, 7, 3]):
        assert 0 <= int(codes[:, level].min()) and int(codes[:, level].max()) < k
        # each level's codeword is the nearest one to that level's residual
        dist = torch.cdist(residuals[:, level], books.codebooks[level])
        assert torch.equal(codes[:, level], dist.argmin(1))
        assert torch.allclose(words[:, level], books.codebooks[level][codes[:, level]])
    assert torch.allclose(residuals[:, 0], h)
    for level in range(2):
        assert torch.allclose(residuals[:, level + 1], residuals[:, level] - words[:, level])
    final_residual = residuals[:, -1] - words[:, -1]
    assert torch.allclose(words.sum(1) + final_residual, h, atol=1e-5)


def test_kmeans_init_equals_faiss_centroids_of_the_first_level(clustered):
    books = ResidualCodebooks([12, 8], dim=16)
    books.kmeans_init(clustered, niter=15, seed=3)
    km = faiss.Kmeans(16, 12, niter=15, seed=3, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 16)
    km.train(np.ascontiguousarray(clustered.numpy(), dtype=np.float32))
    assert torch.allclose(books.codebooks[0].data, torch.from_numpy(km.centroids), atol=1e-5)
    assert bool(books.initialized)
    # level 2 is fit on what level 1 left over: its centroids are small residual vectors
    assert books.codebooks[1].norm(dim=1).mean() < 0.25 * books.codebooks[0].norm(dim=1).mean()


def test_rqvae_initialize_runs_kmeans_on_the_encoded_data(clustered):
    torch.manual_seed(0)
    q = RQVAE(16, codebook_sizes=[12, 4], code_dim=8, hidden_dims=[32], kmeans_iters=10)
    assert not q.initialized
    q.initialize(clustered)
    with torch.no_grad():
        expected = faiss_kmeans(q.encoder(clustered), 12, niter=10, seed=0)
    assert q.initialized
    assert torch.allclose(q.codebooks.codebooks[0].data, expected, atol=1e-5)
    used, perplexity = code_statistics(q.encode(clustered)[:, 0], 12)
    assert used == 1.0 and perplexity > 8  # the 12 clusters map onto the 12 codes


def test_kmeans_with_fewer_points_than_codes_does_not_fail():
    x = torch.randn(5, 4)
    centroids = faiss_kmeans(x, 8)
    assert centroids.shape == (8, 4)
    assert torch.allclose(centroids[:5], x)


def test_rqvae_shapes_losses_and_gradients(clustered):
    torch.manual_seed(0)
    q = RQVAE(16, output_dim=20, codebook_sizes=[8, 8, 4], code_dim=6, hidden_dims=[32])
    q.initialize(clustered)
    target = torch.randn(600, 20)
    out = q(clustered[:64], target[:64])
    assert out.reconstruction.shape == (64, 20)
    assert out.codes.shape == (64, 3) and out.codes.dtype == torch.long
    assert set(out.losses) == {"recon", "codebook", "commitment"}
    expected = out.losses["recon"] + out.losses["codebook"] + 0.25 * out.losses["commitment"]
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    for name in ("encoder.0.weight", "decoder.0.weight", "codebooks.codebooks.0"):
        grad = dict(q.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_rqvae_fit_reduces_its_loss(clustered):
    torch.manual_seed(0)
    q = RQVAE(16, codebook_sizes=[12, 8], code_dim=8, hidden_dims=[32])
    q.initialize(clustered)
    q.eval()
    before = float(q(clustered).loss)
    q.fit(clustered, epochs=40, batch_size=200, lr=3e-3)
    after = float(q(clustered).loss)
    assert after < 0.7 * before


def test_dead_codes_are_moved_onto_residuals():
    torch.manual_seed(0)
    q = RQVAE(8, codebook_sizes=[16], code_dim=4, hidden_dims=[16], dead_code_steps=2)
    x = torch.randn(200, 8)
    q.initialize(x)
    # Push half the codebook far away: nobody picks those codes any more.
    q.codebooks.codebooks[0].data[8:] += 100.0
    assert code_statistics(q.encode(x)[:, 0], 16)[0] <= 0.5
    q.train()
    q(x)
    q(x)  # the second step triggers the dead-code check
    assert q.codebooks.codebooks[0].data[8:].abs().max() < 50
    assert code_statistics(q.encode(x)[:, 0], 16)[0] > 0.5


def test_ema_update_moves_codewords_towards_their_cluster_means():
    books = ResidualCodebooks([2], dim=2)
    books.codebooks[0].data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    residuals = torch.tensor([[1.0, 1.0], [3.0, 3.0]])[:, None, :]
    codes = torch.tensor([[0], [0]])
    books.ema_update(codes, residuals, decay=0.5)
    assert torch.allclose(books.codebooks[0].data[0], torch.tensor([1.0, 1.0]))  # 0.5*0 + 0.5*2
    assert torch.allclose(books.codebooks[0].data[1], torch.tensor([10.0, 10.0]))  # no members


def test_residual_kmeans_error_shrinks_with_each_level(clustered):
    q = ResidualKMeans(16, codebook_sizes=[12, 8, 8]).fit(clustered)
    codes = q.encode(clustered)
    assert codes.shape == (600, 3) and not q.trainable
    _, residuals, words = q.codebooks(clustered)
    errors = [float((residuals[:, lv] - words[:, lv]).pow(2).sum(-1).mean()) for lv in range(3)]
    assert errors[0] > errors[1] > errors[2]
    out = q(clustered)
    assert float(out.loss) == 0.0 and out.reconstruction.shape == (600, 16)


@pytest.mark.parametrize("cls", [RQVAE, ResidualKMeans])
def test_both_quantizers_share_one_interface(cls, clustered):
    q = cls(16, 16, codebook_sizes=[8, 4])
    q.initialize(clustered)
    codes, distances = q.encode_with_distances(clustered)
    assert codes.shape == (600, 2) and distances.shape == (600, 4)
    assert torch.equal(q.encode(clustered), codes)
    assert q.codebook_sizes == [8, 4] and q.num_levels == 2 and q.initialized
    assert q.config["class"] == cls.__name__
    # the distances belong to the chosen last-level code
    assert torch.equal(distances.argmin(1), codes[:, -1])


def test_u2i_loss_matches_a_manual_sampled_softmax():
    torch.manual_seed(0)
    users, items = torch.randn(4, 8), torch.randn(10, 8)
    positives = torch.tensor([0, 1, 2, 3])
    negatives = torch.tensor([[4, 5, 6], [5, 6, 7], [7, 8, 9], [4, 8, 9]])
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 2] = False
    loss = U2IAlignmentLoss(temperature=0.5)(users, items, positives, negatives, mask)
    u, it = F.normalize(users, dim=1), F.normalize(items, dim=1)
    expected = []
    for b in range(4):
        negs = [int(n) for n, ok in zip(negatives[b], mask[b]) if ok]
        logits = torch.stack([u[b] @ it[positives[b]]] + [u[b] @ it[n] for n in negs]) / 0.5
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)


def test_u2i_loss_is_lower_for_aligned_users():
    torch.manual_seed(0)
    items = torch.randn(20, 8)
    negatives = torch.arange(1, 11).repeat(2, 1)
    aligned = U2IAlignmentLoss()(items[[0, 0]], items, torch.tensor([0, 0]), negatives)
    random_users = U2IAlignmentLoss()(torch.randn(2, 8), items, torch.tensor([0, 0]), negatives)
    assert aligned < random_users
