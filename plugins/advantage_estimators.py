"""Built-in advantage estimators: ``gae`` (PPO), ``grpo``, ``rloo`` and ``reinforce_pp``.

Each turns an iteration's rewards into per-token advantages (see :mod:`align.rl.advantages`). The
sequence-level ones (``grpo``, ``rloo``) give every token of a response its response's advantage; their
rewards are the response's score minus its whole KL penalty (zero when ``kl_coef`` is 0, as GRPO's is).

Sources: Schulman et al. 2016 (GAE); Shao et al. 2024 (GRPO); Liu et al. 2025 (Dr. GRPO: no division by
the group's standard deviation); Ahmadian et al. 2024 (RLOO); Hu 2025 (REINFORCE++). The arithmetic
follows verl's ``core_algos.py`` (read, not copied) and is tested against hand computations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from align import AlignError, hookimpl
from align.rl.advantages import AdvantageEstimator, AdvantageInputs, discounted_returns, gae, group_reduce
from align.schema import NoOptions, setting

if TYPE_CHECKING:
    import torch


class GAE(AdvantageEstimator):
    """Generalised advantage estimation from a critic: PPO's (γ ``gamma``, λ ``lam``)."""

    name = "gae"
    needs_critic = True

    def estimate(self, inputs: AdvantageInputs, options: NoOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
        if inputs.values is None:
            raise AlignError("the gae estimator needs the critic's values")  # the loop loads one for it
        return gae(inputs.token_rewards, inputs.values, inputs.mask, inputs.gamma, inputs.lam)


@dataclass
class GRPOOptions:
    # "group", "batch", "none": TRL's scale_rewards; "none" is Dr. GRPO's choice.
    scale_rewards: Literal["group", "batch", "none"] = setting(
        "group",
        help="Divide by the rewards' standard deviation in the group (GRPO), the batch, or not at all "
        "(none: Dr. GRPO, which finds the division favours too easy and too hard prompts).",
    )
    epsilon: float = setting(1e-4, help="Added to the standard deviation before dividing (TRL's value).", above=0)


class GRPO(AdvantageEstimator):
    """Group-relative: a response's reward minus its group's mean, over the group's standard deviation."""

    name = "grpo"
    Config = GRPOOptions
    needs_groups = True

    def estimate(self, inputs: AdvantageInputs, options: GRPOOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
        rewards = inputs.sequence_rewards
        advantages = rewards - group_reduce(rewards, inputs.groups, "mean")
        if options.scale_rewards == "group":
            advantages = advantages / (group_reduce(rewards, inputs.groups, "std") + options.epsilon)
        elif options.scale_rewards == "batch":
            advantages = advantages / (rewards.std() + options.epsilon)
        return inputs.per_token(advantages), None


class RLOO(AdvantageEstimator):
    """REINFORCE leave-one-out: a response's reward minus the mean reward of the rest of its group."""

    name = "rloo"
    needs_groups = True

    def estimate(self, inputs: AdvantageInputs, options: NoOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
        rewards = inputs.sequence_rewards
        size = group_reduce(rewards, inputs.groups, "count")
        others = (group_reduce(rewards, inputs.groups, "sum") - rewards) / (size - 1)
        return inputs.per_token(rewards - others), None


class ReinforcePlusPlus(AdvantageEstimator):
    """REINFORCE++: each token's discounted reward-to-go (KL penalty included), whitened over the batch."""

    name = "reinforce_pp"

    def estimate(self, inputs: AdvantageInputs, options: NoOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
        from align.rl.masked import whiten

        returns = discounted_returns(inputs.token_rewards, inputs.mask, inputs.gamma)
        return whiten(returns, inputs.mask), None


@hookimpl
def align_register_advantage_estimators() -> list[AdvantageEstimator]:
    return [GAE(), GRPO(), RLOO(), ReinforcePlusPlus()]
