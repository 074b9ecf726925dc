"""Advantage estimators: how an online-RL algorithm turns rewards into the signal each token is trained on.

An estimator is a plugin (``align_register_advantage_estimators``); a stage's ``advantage_estimator:
NAME`` picks one and ``estimator_options`` are checked against its ``Config`` when the recipe loads. The
loop hands it an :class:`AdvantageInputs` and trains on what :meth:`AdvantageEstimator.estimate` returns.
Whether a critic (value model) is loaded and trained follows from the estimator's ``needs_critic``;
``needs_groups`` makes the loop refuse ``num_generations: 1``.

Built in (``align.plugins.advantage_estimators``): ``gae`` (PPO), ``grpo`` (group-normalised, Dr. GRPO
without the std scaling), ``rloo`` (leave-one-out) and ``reinforce_pp`` (REINFORCE++). A third-party
estimator subclasses :class:`AdvantageEstimator` and registers like any plugin:

.. code-block:: python

    class MaxBaseline(AdvantageEstimator):
        name = "max_baseline"
        needs_groups = True

        def estimate(self, inputs, options):
            scores = inputs.sequence_rewards
            best = group_reduce(scores, inputs.groups, "amax")
            return inputs.per_token(scores - best), None

    @hookimpl
    def align_register_advantage_estimators():
        return [MaxBaseline()]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.schema import NoOptions

if TYPE_CHECKING:
    import torch

__all__ = ["AdvantageEstimator", "AdvantageInputs", "discounted_returns", "gae", "group_reduce"]


@dataclass
class AdvantageInputs:
    """What an estimator may use. All tensors are on one device; rows are responses.

    ``token_rewards`` holds each response's score at its last token minus, per token, the KL penalty
    (``kl_coef`` × the KL estimate; zero when there is no penalty).
    """

    token_rewards: torch.Tensor  #: (rows, response_width)
    mask: torch.Tensor  #: (rows, response_width), 1 on response tokens
    groups: torch.Tensor  #: (rows,): responses to the same prompt share a number
    values: torch.Tensor | None  #: the critic's estimates, (rows, response_width), with ``needs_critic``
    gamma: float  #: the discount within a response
    lam: float  #: GAE's λ

    @property
    def sequence_rewards(self) -> torch.Tensor:
        """Each response's total reward, (rows,): its score minus its whole KL penalty."""
        return (self.token_rewards * self.mask).sum(1)

    def per_token(self, advantages: torch.Tensor) -> torch.Tensor:
        """One advantage per response, (rows,), given to each of its tokens."""
        return advantages.unsqueeze(1) * self.mask


class AdvantageEstimator:
    """Base class for advantage-estimator plugins."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    #: Whether the loop loads and trains a value model (its estimates arrive as ``inputs.values``).
    needs_critic: ClassVar[bool] = False
    #: Whether responses must come in groups of several per prompt (``num_generations`` ≥ 2).
    needs_groups: ClassVar[bool] = False

    def estimate(self, inputs: AdvantageInputs, options: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The advantage of every response token, (rows, response_width), zero on padding; and with a
        critic, the returns it is trained towards (else None)."""
        raise NotImplementedError


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens.

    :returns: advantages and returns (advantages + values), zero on padding.
    """
    import torch

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


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each token's reward-to-go within its response: r_t + γ r_{t+1} + …, zero on padding."""
    import torch

    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t].to(rewards.dtype)
        returns[:, t] = running
    return returns


def group_reduce(
    values: torch.Tensor, groups: torch.Tensor, reduce: Literal["mean", "sum", "std", "amax", "amin", "count"]
) -> torch.Tensor:
    """For each row, a statistic of its group's ``values`` (rows,): the group's mean, sum, standard deviation
    (unbiased; 0 for a group of one), maximum, minimum or size."""
    import torch

    _, index = torch.unique(groups, return_inverse=True)
    size = torch.zeros(int(index.max()) + 1, dtype=values.dtype, device=values.device)
    size.index_add_(0, index, torch.ones_like(values))
    if reduce == "count":
        return size[index]
    if reduce in ("amax", "amin"):
        fill = float("-inf") if reduce == "amax" else float("inf")
        out = torch.full_like(size, fill).scatter_reduce(0, index, values, reduce, include_self=True)
        return out[index]
    total = torch.zeros_like(size).index_add_(0, index, values)
    if reduce == "sum":
        return total[index]
    mean = total / size
    if reduce == "mean":
        return mean[index]
    squares = torch.zeros_like(size).index_add_(0, index, (values - mean[index]) ** 2)
    return (squares / (size - 1).clamp(min=1)).sqrt()[index]
