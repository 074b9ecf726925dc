"""KL to the reference: per-token estimators, and the controllers that set the penalty's weight.

Sources: Schulman, "Approximating KL divergence" (2020) for the estimators; Ziegler et al. 2019 and
openai/lm-human-preferences for the adaptive controller.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["AdaptiveKL", "FixedKL", "KLController", "kl_per_token"]


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"]) -> torch.Tensor:
    """A per-token estimate of KL(policy || reference) from sampled tokens.

    k1 = log p - log q is unbiased but can be negative; k3 = (r - 1) - log r with r = q / p is unbiased and
    never negative, with lower variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


class KLController:
    """The weight of the KL penalty in the reward, updated after every iteration."""

    value: float

    def update(self, observed_kl: float, steps: int) -> None:
        """Take one iteration's mean KL (nats per response) over ``steps`` responses into account."""


class FixedKL(KLController):
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        self.value = coef


class AdaptiveKL(KLController):
    """Ziegler et al. 2019's controller: nudge the coefficient so that the KL approaches ``target``.

    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * steps / horizon (lm-human-preferences).
    """

    def __init__(self, coef: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, steps: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * steps / self.horizon
