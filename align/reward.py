"""What a reward-function plugin is: a rule that scores responses without a reward model.

A reward function is called with the prompts and responses as text and, as keyword arguments, the prompt
rows' other columns (one list per column, aligned with the prompts): a row ``{"messages": …, "answer":
"12"}`` reaches it as ``answer=["12", …]``. A rule that needs no column takes ``**columns`` and ignores
it. Its options (``Config``) are set per use in a recipe:

.. code-block:: yaml

    reward_functions:
      - exact_answer
      - {function: format, weight: 0.5, options: {pattern: "Answer: \\\\d+$"}}

:meth:`RewardFunction.score` is how align calls one: it checks what comes back, so a rule returning the
wrong number of scores or a NaN is an error that names it, not a crash steps later.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from align.errors import AlignError
from align.schema import NoOptions, build, setting

if TYPE_CHECKING:
    from align.plugin_manager import AlignPluginManager

__all__ = ["RewardFunction", "RewardSpec", "columns_of", "reward_functions_setting", "resolve_reward_functions"]


class RewardFunction:
    """Base class for reward-function plugins (registered with ``align_register_reward_functions``).

    Online RL adds its scores (each weighted) to the reward model's, or uses them alone; evaluation and
    ``score:`` report them. Options are read from ``self.config``, an instance of ``Config``.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    config: Any = NoOptions()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        raise NotImplementedError

    def with_options(self, options: Mapping[str, Any], path: str) -> RewardFunction:
        """A copy of this function with ``options`` (checked against ``Config``; ``path`` names them in errors)."""
        configured = copy.copy(self)
        configured.config = build(self.Config, dict(options), path)
        return configured

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None
    ) -> list[float]:
        """The rule's scores, one finite float per response, or an :class:`~align.AlignError` naming the rule."""
        try:
            scores = [float(s) for s in self(prompts, responses, **(columns or {}))]
        except TypeError as error:
            if "unexpected keyword argument" not in str(error):
                raise
            raise AlignError(
                f"reward function '{self.name}' does not accept the prompt rows' columns ({error})",
                hint="declare it as __call__(self, prompts, responses, **columns); the columns are keyword arguments",
            ) from error
        if len(scores) != len(responses):
            raise AlignError(
                f"reward function '{self.name}' returned {len(scores)} scores for {len(responses)} responses",
                hint="a reward function returns one number per response, in order",
            )
        bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
        if bad is not None:
            raise AlignError(
                f"reward function '{self.name}' returned {scores[bad]} for response {bad}: {responses[bad][:80]!r}",
                hint="a reward function must return finite numbers",
            )
        return scores


@dataclass
class RewardSpec:
    """One reward function in a recipe, with its weight and options."""

    function: str = setting(help="The reward function's name (`align plugins` lists them).")
    # Negative weights are meaningful (a penalty); what is not is NaN or infinity.
    weight: float = setting(
        1.0, help="Its scores are multiplied by this before they are added up.", above=-math.inf, below=math.inf
    )
    options: dict[str, Any] = setting(default_factory=dict, help="The function's own settings (its Config).")


def reward_functions_setting() -> Any:
    return setting(
        default_factory=list,
        help="Rules that score responses: names ([exact_answer, format]) or {function, weight, options}.",
    )


def resolve_reward_functions(
    entries: Sequence[str | RewardSpec], plugins: AlignPluginManager, path: str
) -> list[tuple[RewardFunction, float]]:
    """The configured functions of a ``reward_functions`` setting, with their weights.

    Raises an :class:`~align.AlignError` for an unknown name (with the known ones), a function listed twice
    (its scores would be logged under one name) or options its ``Config`` does not take.
    """
    resolved: list[tuple[RewardFunction, float]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        spec = RewardSpec(function=entry) if isinstance(entry, str) else entry
        if spec.function in seen:
            raise AlignError(
                f"'{path}' lists reward function '{spec.function}' twice",
                hint="list each function once; give it a weight instead of repeating it",
            )
        seen.add(spec.function)
        function: RewardFunction = plugins.get("reward function", spec.function)
        resolved.append((function.with_options(spec.options, f"{path}[{index}].options"), spec.weight))
    return resolved


def columns_of(rows: Sequence[Any]) -> dict[str, list[Any]]:
    """The prompt rows' other columns as reward functions receive them: name → one value per row (None
    where a row lacks it). ``rows`` are :class:`~align.conversation.Example` or anything with ``columns``."""
    names = dict.fromkeys(name for row in rows for name in row.columns)
    return {name: [row.columns.get(name) for row in rows] for name in names}
