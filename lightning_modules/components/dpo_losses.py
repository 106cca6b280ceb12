"""Preference losses for the dpo stage: softmax-DPO (one chosen vs N rejected) and plain DPO.

Both share one signature (torchtune-like), so a YAML swaps them with one ``class_path``::

    loss(policy_chosen_logps [B], policy_rejected_logps [B, N],
         ref_chosen_logps [B], ref_rejected_logps [B, N], rejected_mask=None [B, N] bool)
      -> losses [B], chosen_rewards [B], rejected_rewards [B, N]

All log-probabilities are sums over the response tokens (nats). Rewards are the implicit DPO
rewards ``beta * (log pi - log pi_ref)``, detached (they are for logging). ``rejected_mask``
marks real negatives: a prompt may have fewer than N negatives of the wanted difficulty, so
rows are padded and the padding must not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_shapes(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                  ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                  rejected_mask: torch.Tensor | None) -> torch.Tensor:
    if policy_rejected_logps.dim() == 1:
        raise ValueError("rejected log-probs must be [B, N] (use N=1 for a single negative)")
    if policy_chosen_logps.shape != ref_chosen_logps.shape or policy_chosen_logps.dim() != 1:
        raise ValueError(f"chosen log-probs must both be [B], got "
                         f"{tuple(policy_chosen_logps.shape)} and {tuple(ref_chosen_logps.shape)}")
    if policy_rejected_logps.shape != ref_rejected_logps.shape or \
            policy_rejected_logps.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(f"rejected log-probs must both be [B, N] with B="
                         f"{policy_chosen_logps.shape[0]}, got {tuple(policy_rejected_logps.shape)}"
                         f" and {tuple(ref_rejected_logps.shape)}")
    if rejected_mask is None:
        return torch.ones_like(policy_rejected_logps, dtype=torch.bool)
    if rejected_mask.shape != policy_rejected_logps.shape:
        raise ValueError("rejected_mask must have the shape of the rejected log-probs")
    return rejected_mask.bool()


class SoftmaxDPOLoss(nn.Module):
    """Softmax-DPO (S-DPO): one chosen response against N rejected ones at once.

    ``L = -log sigmoid(-log sum_j exp(beta * [(log pi - log pi_ref)(y_l,j)
    - (log pi - log pi_ref)(y_w)]))``; with N = 1 this is exactly plain DPO. Rows without any
    real negative get loss 0 (they carry no preference).

    Args:
        beta: inverse temperature of the implicit reward (the paper uses 1.0).
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                rejected_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, rejected_mask)
        chosen_logratio = policy_chosen_logps - ref_chosen_logps                  # [B]
        rejected_logratio = policy_rejected_logps - ref_rejected_logps            # [B, N]
        logits = self.beta * (rejected_logratio - chosen_logratio.unsqueeze(1))   # [B, N]
        # Padded negatives contribute exp(-inf) = 0 to the sum.
        logits = logits.masked_fill(~mask, float("-inf"))
        has_negative = mask.any(dim=1)
        # A row of only -inf would give NaN gradients through logsumexp; give it finite dummy
        # logits and zero its loss below.
        logits = torch.where(has_negative.unsqueeze(1), logits, torch.zeros_like(logits))
        lse = torch.logsumexp(logits, dim=1)
        losses = -F.logsigmoid(-lse)
        losses = torch.where(has_negative, losses, torch.zeros_like(losses))
        return losses, *_rewards(self.beta, chosen_logratio, rejected_logratio)


class DPOLoss(nn.Module):
    """Plain (pairwise) DPO. With N negatives per prompt, each (chosen, rejected_j) pair is one
    DPO term and the prompt's loss is their mean over the real negatives.

    Args:
        beta: inverse temperature of the implicit reward.
        label_smoothing: conservative DPO (cDPO): the assumed probability that a preference
            label is flipped; 0 is standard DPO.
    """

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                rejected_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, rejected_mask)
        chosen_logratio = policy_chosen_logps - ref_chosen_logps
        rejected_logratio = policy_rejected_logps - ref_rejected_logps
        margin = self.beta * (chosen_logratio.unsqueeze(1) - rejected_logratio)  # [B, N]
        eps = self.label_smoothing
        pair_losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
        pair_losses = pair_losses.masked_fill(~mask, 0.0)
        losses = pair_losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return losses, *_rewards(self.beta, chosen_logratio, rejected_logratio)


def _rewards(beta: float, chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def reward_statistics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      rejected_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Scalars to log: mean chosen/rejected reward, margin and reward accuracy.

    Accuracy = share of real (chosen, rejected) pairs where the chosen reward is higher.
    """
    if rejected_mask is None:
        rejected_mask = torch.ones_like(rejected_rewards, dtype=torch.bool)
    m = rejected_mask.float()
    n = m.sum().clamp(min=1.0)
    rows = rejected_mask.any(dim=1).float()
    margins = chosen_rewards.unsqueeze(1) - rejected_rewards
    return {
        "rewards/chosen": (chosen_rewards * rows).sum() / rows.sum().clamp(min=1.0),
        "rewards/rejected": (rejected_rewards * m).sum() / n,
        "rewards/margin": (margins * m).sum() / n,
        "rewards/accuracy": ((margins > 0).float() * m).sum() / n,
    }
