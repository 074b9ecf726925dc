"""What a rollout-engine plugin is: how responses are generated from a policy.

PPO and evaluation generate through an engine registered with ``align_register_rollout_engines``. An
engine is :meth:`RolloutEngine.start`-ed once per stage with the policy and returns a
:class:`RolloutSession`, which generates from token ids and is told after every policy update
(:meth:`RolloutSession.sync`) so that it generates from the new weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from align.schema import build

if TYPE_CHECKING:
    from align.memory import ModelShape, Need
    from align.plugin_manager import AlignPluginManager
    from align.progress import Progress
    from align.recipe import Recipe

__all__ = ["RolloutEngine", "RolloutSession", "Sampling", "check_engine", "engine_named", "generate_in_chunks"]


@dataclass(frozen=True)
class Sampling:
    """How to sample: the same settings reach every engine, so their outputs are comparable."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0


class RolloutSession:
    """A running engine for one policy."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        """Response token ids for each prompt (prompt not included), ending at EOS when one was generated."""
        raise NotImplementedError

    def sync(self, model: Any) -> None:
        """Make the engine generate from ``model``'s current weights (called after every policy update)."""

    def close(self) -> None:
        """Free what the session holds (GPU memory, worker processes)."""


class RolloutEngine:
    """Base class for rollout-engine plugins; ``Config`` holds engine-specific settings.

    ``fallback = True`` offers the engine for settings that name none (task scores, evaluation); when
    several do, the first by name serves.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    fallback: ClassVar[bool] = False

    def check(self, config: Any) -> None:
        """Refuse, with an :class:`~align.AlignError`, what this machine cannot run (at recipe check)."""

    def check_model(self, architecture: Mapping[str, Any], config: Any) -> None:
        """Refuse, with an :class:`~align.AlignError`, a model this engine cannot generate from (at recipe
        check). ``architecture`` holds the base model's ``config.json`` values
        (:meth:`~align.model_source.ModelSource.architecture`); it is not called when the model source cannot tell them.
        """

    def start(self, model: Any, model_path: str, tokenizer: Any, config: Any) -> RolloutSession:
        """Start a session generating from ``model`` (whose weights were loaded from ``model_path``)."""
        raise NotImplementedError

    def memory(self, config: Any, shape: ModelShape, sequences: int, length: int, bytes_per_value: int) -> list[Need]:
        """What generating ``sequences`` at once up to ``length`` tokens holds per process, beyond the policy
        (for the memory plan): a KV cache, an engine's own copy of the weights. ``bytes_per_value``: the
        policy's dtype."""
        return []


def check_engine(
    plugins: AlignPluginManager, recipe: Recipe, name: str | None, options: Mapping[str, Any], key: str
) -> None:
    """Refuse, at recipe check, an engine that is not registered, options it does not take, and what it
    cannot run: on this machine (:meth:`RolloutEngine.check`) or for the recipe's model
    (:meth:`RolloutEngine.check_model`). ``key`` is where the options were written, for messages."""
    engine = engine_named(plugins, name)
    config: Any = build(engine.Config, options, key)
    engine.check(config)
    architecture = plugins.get("model source", recipe.model.source).architecture(recipe.model.config)
    if architecture is not None:
        engine.check_model(architecture, config)


def engine_named(plugins: AlignPluginManager, name: str | None) -> RolloutEngine:
    """The engine ``name`` names, or for ``None`` the registered fallback engine (see :class:`RolloutEngine`)."""
    if name is not None:
        return plugins.get("rollout engine", name)  # type: ignore[no-any-return]
    return plugins.fallback("rollout engine", "`engine:`")  # type: ignore[no-any-return]


def generate_in_chunks(
    session: RolloutSession, prompts: Sequence[Sequence[int]], sampling: Sampling, bar: Progress | None = None
) -> list[list[int]]:
    """``session.generate`` over ``prompts`` a chunk at a time, advancing ``bar`` by each chunk's prompts.

    About ten chunks of at least 16 prompts: a bar that moves, and batches still large enough to keep an
    engine busy. Chunk ``i`` samples with ``sampling.seed`` plus the index of its first prompt, so that an
    engine seeding each prompt by its position (vllm) samples exactly as in one call, and the answers do
    not depend on whether anyone watches.
    """
    import dataclasses

    size = max(16, -(-len(prompts) // 10))
    responses: list[list[int]] = []
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        responses += session.generate(chunk, dataclasses.replace(sampling, seed=sampling.seed + start))
        if bar is not None:
            bar.update(advance=len(chunk))
    return responses
