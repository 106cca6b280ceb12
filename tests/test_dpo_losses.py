"""Softmax-DPO and plain DPO: hand-computed values, N=1 equivalence, masking, gradients."""

import math

import pytest
import torch

from lightning_modules.components.dpo_losses import DPOLoss, SoftmaxDPOLoss, reward_statistics


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_softmax_dpo_hand_computed():
    beta = 0.5
    pc, rc = torch.tensor([-2.0]), torch.tensor([-3.0])              # chosen log-ratio +1
    pr, rr = torch.tensor([[-4.0, -1.0]]), torch.tensor([[-3.0, -2.0]])  # log-ratios -1, +1
    losses, chosen_r, rejected_r = SoftmaxDPOLoss(beta)(pc, pr, rc, rr)
    # sum_j exp(beta * (r_l,j - r_w)) = exp(0.5 * -2) + exp(0.5 * 0) = e^-1 + 1
    expected = -math.log(_sigmoid(-math.log(math.exp(-1.0) + 1.0)))
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.5])
    assert rejected_r.tolist() == [pytest.approx([-0.5, 0.5])]


def test_plain_dpo_hand_computed():
    pc, rc = torch.tensor([-1.0]), torch.tensor([-1.5])
    pr, rr = torch.tensor([[-2.0]]), torch.tensor([[-1.0]])
    losses, _, _ = DPOLoss(beta=2.0)(pc, pr, rc, rr)
    # margin = 2 * (0.5 - (-1.0)) = 3
    assert losses.item() == pytest.approx(-math.log(_sigmoid(3.0)), rel=1e-6)


def test_softmax_equals_plain_at_one_negative():
    g = torch.Generator().manual_seed(0)
    pc, rc = torch.randn(7, generator=g), torch.randn(7, generator=g)
    pr, rr = torch.randn(7, 1, generator=g), torch.randn(7, 1, generator=g)
    s, sc, sr = SoftmaxDPOLoss(beta=0.7)(pc, pr, rc, rr)
    p, pcr, prr = DPOLoss(beta=0.7)(pc, pr, rc, rr)
    torch.testing.assert_close(s, p)
    torch.testing.assert_close(sc, pcr)
    torch.testing.assert_close(sr, prr)


def test_mask_equals_dropping_padded_negatives_and_empty_rows_are_zero():
    g = torch.Generator().manual_seed(1)
    pc, rc = torch.randn(3, generator=g), torch.randn(3, generator=g)
    pr, rr = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    pr.requires_grad_(True)
    for loss in (SoftmaxDPOLoss(1.0), DPOLoss(1.0)):
        masked, _, _ = loss(pc, pr, rc, rr, rejected_mask=mask)
        first, _, _ = loss(pc[:1], pr[:1, :2], rc[:1], rr[:1, :2])
        torch.testing.assert_close(masked[0], first[0])
        assert masked[2].item() == 0.0
        (grad,) = torch.autograd.grad(masked.sum(), pr)
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all() and (grad[0, :2] != 0).all()


def test_loss_decreases_when_chosen_gains_and_rejected_loses():
    loss = SoftmaxDPOLoss(1.0)
    zero, zeros = torch.zeros(1), torch.zeros(1, 3)
    base, _, _ = loss(zero, zeros, zero, zeros)
    assert base.item() == pytest.approx(math.log(4.0), rel=1e-6)  # -log sigmoid(-log 3)
    better, _, _ = loss(zero + 1, zeros - 1, zero, zeros)
    assert better.item() < base.item()


def test_shape_errors():
    with pytest.raises(ValueError):
        SoftmaxDPOLoss()(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError):
        DPOLoss()(torch.zeros(2), torch.zeros(3, 1), torch.zeros(2), torch.zeros(3, 1))


def test_reward_statistics():
    stats = reward_statistics(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0], [-1.0, 5.0]]),
                              torch.tensor([[1, 1], [1, 0]], dtype=torch.bool))
    # margins over real pairs: 1, -1, 1 -> accuracy 2/3, margin mean 1/3
    assert stats["rewards/accuracy"].item() == pytest.approx(2 / 3)
    assert stats["rewards/margin"].item() == pytest.approx(1 / 3)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5)
    assert stats["rewards/rejected"].item() == pytest.approx(1 / 3)
