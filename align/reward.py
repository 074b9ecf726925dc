"""What a reward-function plugin is: a rule that scores responses without a reward model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = ["RewardFunction"]


class RewardFunction:
    """Base class for reward-function plugins (registered with ``align_register_reward_functions``).

    Called with the prompts and responses as text; returns one number per response. PPO adds it to (or
    uses it instead of) the reward model's score, and evaluation reports it.
    """

    name: ClassVar[str]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError
