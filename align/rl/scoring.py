"""Scoring responses: a reward model, reward functions, or both, each part kept under its own name.

The score of a response is ``reward_model_weight × the reward model's score + Σ weight × function``;
:class:`Scores` also keeps every part, so a run logs ``rm_score`` and ``reward_<function>`` beside the
total and a user sees which rule moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.reward import RewardFunction

if TYPE_CHECKING:
    import torch

    from align.rl.batch import RolloutBatch

__all__ = ["Scorer", "Scores"]

#: The name the reward model's part of the score is logged under.
REWARD_MODEL = "rm_score"


@dataclass
class Scores:
    """Each response's total score, and the parts it is the weighted sum of (unweighted, by name)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class Scorer:
    """Scores responses with a reward model (a sequence classifier, or None) and weighted reward functions.

    :param chunk: rows per reward-model forward pass (None: all at once).
    """

    def __init__(
        self,
        reward_model: Any | None,
        functions: Sequence[tuple[RewardFunction, float]],
        *,
        reward_model_weight: float = 1.0,
        chunk: int | None = None,
    ) -> None:
        if reward_model is None and not functions:
            raise ValueError("a Scorer needs a reward model or reward functions")
        self.reward_model, self.functions = reward_model, list(functions)
        self.reward_model_weight, self.chunk = reward_model_weight, chunk

    def __call__(
        self,
        batch: RolloutBatch,
        prompts: Sequence[str],
        responses: Sequence[str],
        columns: Mapping[str, Sequence[Any]],
    ) -> Scores:
        """Score each row of ``batch``, whose prompt and response texts and prompt-row columns are given."""
        import torch

        from align.rl.forward import reward_scores

        device = batch.input_ids.device
        total = torch.zeros(len(batch), device=device)
        parts: dict[str, torch.Tensor] = {}
        if self.reward_model is not None:
            parts[REWARD_MODEL] = reward_scores(self.reward_model, batch, self.chunk)
            total += self.reward_model_weight * parts[REWARD_MODEL]
        for function, weight in self.functions:
            scores = function.score(prompts, responses, columns)
            parts[f"reward_{function.name}"] = torch.tensor(scores, device=device, dtype=total.dtype)
            total += weight * parts[f"reward_{function.name}"]
        return Scores(total, parts)
