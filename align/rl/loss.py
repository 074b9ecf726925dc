"""The losses of the online-RL loop, and how token losses are aggregated into one number.

A minibatch may be split into micro-batches (``micro_batch_size``) whose gradients accumulate: every loss
here divides by the *minibatch's* totals (:class:`Totals`), not the micro-batch's, so the accumulated
gradient equals the one of the whole minibatch at once, whatever the split.

Aggregations (``loss_aggregation``):

* ``token``: the mean over every response token of the minibatch (DAPO; TRL's ``dapo``; PPO's usual form);
* ``sequence``: each response's mean over its tokens, then the mean over responses (the GRPO paper's);
* ``constant``: the sum over tokens divided by responses × ``max_new_tokens`` (Dr. GRPO): no length bias.

Sources: Schulman et al. 2017 (clipping), "N details" 4-5 (value clipping), Yu et al. 2025 (DAPO: separate
low and high clip bounds), Liu et al. 2025 (Dr. GRPO), Shao et al. 2024 (GRPO's k3 KL term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["Aggregation", "PolicyLoss", "Totals", "aggregate", "kl_loss", "policy_loss", "value_loss"]

Aggregation = Literal["token", "sequence", "constant"]


@dataclass(frozen=True)
class Totals:
    """The minibatch's size, which every micro-batch's loss is divided by."""

    tokens: float  #: response tokens in the minibatch
    rows: int  #: responses in the minibatch
    max_new_tokens: int  #: the response length limit (``constant`` aggregation)

    @classmethod
    def of(cls, mask: torch.Tensor, max_new_tokens: int) -> Totals:
        return cls(float(mask.sum().clamp(min=1)), int(mask.shape[0]), max_new_tokens)


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: Aggregation, totals: Totals) -> torch.Tensor:
    """This micro-batch's share of the minibatch's aggregated loss (summed over micro-batches: the whole)."""
    masked = values * mask
    if how == "token":
        return masked.sum() / totals.tokens
    if how == "sequence":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / totals.rows
    return masked.sum() / (totals.rows * totals.max_new_tokens)


@dataclass
class PolicyLoss:
    """The clipped surrogate loss of a micro-batch and what is logged about it (shares of the minibatch)."""

    loss: torch.Tensor
    clip_fraction: float  #: tokens whose ratio was clipped
    approx_kl: float  #: ½ (log ratio)², an estimate of KL(old policy || new policy)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    how: Aggregation,
    totals: Totals,
) -> PolicyLoss:
    """The clipped surrogate objective, with the ratio kept in [1 - clip_low, 1 + clip_high]."""
    import torch

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, how, totals)
    with torch.no_grad():
        clip_fraction = ((clipped > unclipped).float() * mask).sum().item() / totals.tokens
        approx_kl = 0.5 * ((log_ratio**2) * mask).sum().item() / totals.tokens
    return PolicyLoss(loss, clip_fraction, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    totals: Totals,
) -> tuple[torch.Tensor, float]:
    """Half the clipped squared error of the critic (token mean), and the share of tokens clipped."""
    import torch

    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * (torch.maximum(unclipped_error, clipped_error) * mask).sum() / totals.tokens
    with torch.no_grad():
        clip_fraction = ((clipped_error > unclipped_error).float() * mask).sum().item() / totals.tokens
    return loss, clip_fraction


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, how: Aggregation, totals: Totals
) -> torch.Tensor:
    """The k3 estimate of KL(policy || reference), aggregated like the policy loss (GRPO's β term)."""
    from align.rl.kl import kl_per_token

    return aggregate(kl_per_token(logprobs, ref_logprobs, "k3"), mask, how, totals)
