"""Prompts for online RL, in seeded epochs, split between processes, resumable.

Each epoch is a new shuffle of every prompt by ``seed + epoch``; process ``rank`` of ``world`` takes the
prompts whose index is ``rank`` modulo ``world``, so the processes never share one and the whole order
depends on the seed alone. :meth:`PromptSampler.state_dict` is the sampler's place in it: a checkpoint
stores it, and a resumed run draws the prompts an uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Prompt", "PromptSampler"]


@dataclass
class Prompt:
    """A prompt's token ids, and its row's other columns (``answer``, …) for reward functions."""

    ids: list[int]
    columns: dict[str, Any] = field(default_factory=dict)


class PromptSampler:
    """Draws batches of :class:`Prompt` for one process."""

    def __init__(self, prompts: Sequence[Prompt], seed: int, *, rank: int = 0, world: int = 1) -> None:
        if len(prompts) < world:
            raise ValueError(f"{len(prompts)} prompts cannot be shared between {world} processes")
        self.prompts, self.seed, self.rank, self.world = list(prompts), seed, rank, world
        self.order: list[int] = []
        self.position = 0
        self.epoch = 0

    def next(self, count: int) -> list[Prompt]:
        """The next ``count`` prompts of this process (a new epoch starts when the order runs out)."""
        batch: list[Prompt] = []
        while len(batch) < count:
            if self.position >= len(self.order):
                self.order = list(range(len(self.prompts)))
                random.Random(self.seed + self.epoch).shuffle(self.order)
                self.position, self.epoch = 0, self.epoch + 1
            index = self.order[self.position]
            self.position += 1
            if index % self.world == self.rank:
                batch.append(self.prompts[index])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order, self.position, self.epoch = list(state["order"]), int(state["position"]), int(state["epoch"])
