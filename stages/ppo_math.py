"""The arithmetic of PPO for language models, as plain tensor functions the ppo stage composes.

Sources for the choices here: Ouyang et al. 2022 (InstructGPT), Ziegler et al. 2019 and their code
(openai/lm-human-preferences), and Huang et al., "The N Implementation Details of RLHF with PPO" (2023),
cited below as "N details".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            return variance
        variance = variance * count / (count - 1)
    return variance


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (N details 9; unbiased variance, as PyTorch does).

    With ``shift_mean=False`` the mean is kept, as for rewards in lm-human-preferences.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens.

    :param rewards: per-token rewards, shape (batch, tokens).
    :param values: the value model's estimate at each token.
    :param mask: 1 for response tokens, 0 for padding after the response ends.
    :returns: advantages and returns (advantages + values), zero on padding.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        live = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * live
        advantages[:, t] = running
        next_value = values[:, t] * live  # past the end of a response, the next value is 0
    return advantages, (advantages + values) * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"]) -> torch.Tensor:
    """A per-token estimate of KL(policy || reference) from sampled tokens (Schulman, "Approximating KL").

    k1 = log p - log q is unbiased but can be negative; k3 = (r - 1) - log r with r = q / p is unbiased and
    never negative, with lower variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


class FixedKL:
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        self.value = coef

    def update(self, observed_kl: float, steps: int) -> None:
        pass


class AdaptiveKL:
    """Ziegler et al. 2019's controller: nudge the coefficient so that the KL approaches ``target``.

    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * steps / horizon (lm-human-preferences).
    """

    def __init__(self, coef: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, steps: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * steps / self.horizon


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``logits`` (divided by the sampling temperature, N details 11)."""
    logits = logits / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    probabilities = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probabilities * logits).sum(-1)


@dataclass
class LossParts:
    """The PPO objective for one minibatch, and what is logged about it."""

    loss: torch.Tensor
    policy_loss: float
    value_loss: float
    clip_fraction: float
    value_clip_fraction: float
    approx_kl: float


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    value_clip_range: float,
    value_coef: float,
) -> LossParts:
    """The clipped surrogate objective and the clipped value loss (Schulman et al. 2017; N details 4-5)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    values_clipped = old_values + torch.clamp(values - old_values, -value_clip_range, value_clip_range)
    value_losses = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_losses, mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask).item()
        value_clip_fraction = masked_mean(((values_clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask).item()
    loss = policy_loss + value_coef * value_loss
    return LossParts(loss, policy_loss.item(), value_loss.item(), clip_fraction, value_clip_fraction.item(), approx_kl)
