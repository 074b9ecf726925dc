"""Built-in reward functions: rules that score a response without a reward model.

``sentiment`` is the ground truth of align's demo task (controlled sentiment, see datasets/README.md): a
response's share of positive sentiment words among all its sentiment words, from -1 (all negative) to 1
(all positive), 0 when it has none. Because it is a rule, it measures whether alignment helped without
trusting a learned reward model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from align import hookimpl
from align.reward import RewardFunction

POSITIVE = frozenset(
    """wonderful great excellent delightful brilliant lovely fantastic enjoyable amazing good nice beautiful
    pleasant superb perfect""".split()
)
NEGATIVE = frozenset(
    """terrible awful boring dull poor horrible disappointing bad ugly worst mediocre dreadful weak""".split()
)
_WORD = re.compile(r"[a-z]+")


class Sentiment(RewardFunction):
    """(positive words - negative words) / sentiment words of the response, in [-1, 1]."""

    name = "sentiment"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [sentiment(text) for text in responses]


def sentiment(text: str) -> float:
    words = _WORD.findall(text.lower())
    positive = sum(word in POSITIVE for word in words)
    negative = sum(word in NEGATIVE for word in words)
    return (positive - negative) / (positive + negative) if positive + negative else 0.0


@hookimpl
def align_register_reward_functions() -> list[RewardFunction]:
    return [Sentiment()]
