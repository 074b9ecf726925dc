"""Scoring a policy on a task with a known answer: generate for held-out prompts, judge with a rule.

A training stage with ``score: {reward_function: sentiment, prompts: demo_prompts_test}`` reports
``task_score`` (the mean rule score of its policy's responses) in its metrics and in ``summary.json``, so
a recipe shows whether each stage moved the policy towards the goal without trusting a learned reward
model. Put it in ``defaults:`` to score every policy of a chain the same way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.data import DataSource
from align.reward import RewardFunction, columns_of
from align.rollout import Sampling, check_engine, engine_named, generate_in_chunks
from align.schema import MAX_SEED, setting

if TYPE_CHECKING:
    from align.conversation import Example
    from align.plugin_manager import AlignPluginManager
    from align.recipe import Recipe
    from align.stage import StageContext

__all__ = ["ScoreSettings", "check_score", "score_prompts", "score_setting", "task_score"]


@dataclass
class ScoreSettings:
    reward_function: str = setting(help="The rule that judges a response (`align plugins` lists them).")
    prompts: str | list[str | DataSource] = setting(help="Prompts the policies did not train on (a dataset).")
    samples: int = setting(64, help="How many of the prompts to answer.", minimum=1)
    max_new_tokens: int = setting(48, help="Longest response.", minimum=1)
    temperature: float = setting(0.7, help="Sampling temperature; 0 answers greedily.", minimum=0)
    seed: int = setting(
        0, help="Sampling seed: the same policy gets the same score twice.", minimum=0, maximum=MAX_SEED
    )
    engine: str | None = setting(
        None, help="The rollout engine that answers (default: the engine installed as the fallback)."
    )


def score_setting() -> Any:
    return setting(
        None,
        help="Score the trained policy on a task with a rule: {reward_function, prompts, "
        "samples, max_new_tokens, temperature, seed}. Reported as task_score.",
    )


def check_score(settings: ScoreSettings | None, plugins: AlignPluginManager, recipe: Recipe) -> None:
    """Refuse a ``score:`` setting naming a reward function or engine that no plugin provides, or an
    engine that cannot generate from the recipe's model."""
    if settings is not None:
        plugins.get("reward function", settings.reward_function)
        check_engine(plugins, recipe, settings.engine, {}, "score.engine")


def score_prompts(settings: ScoreSettings, context: StageContext) -> list[Example]:
    """The ``samples`` prompts a policy is scored on, for a stage that scores more than once."""
    from align.prepare import load_prompts

    loaded = load_prompts(settings.prompts, context.plugins, dataset_dir=context.recipe.dataset_dir)
    return loaded[: settings.samples]


def task_score(
    model: Any, tokenizer: Any, settings: ScoreSettings, context: StageContext, prompts: list[Example] | None = None
) -> dict[str, float]:
    """Generate answers to ``samples`` prompts and average the rule's scores.

    :param prompts: the prompts, when the stage has them from :func:`score_prompts` already.
    """
    from align.render import Renderer

    plugins = context.plugins
    rule: RewardFunction = plugins.get("reward function", settings.reward_function)
    prompts = prompts if prompts is not None else score_prompts(settings, context)
    renderer = Renderer(tokenizer, max_length=1 << 30)
    prompt_ids = [renderer.prompt_ids(p.messages) for p in prompts]
    engine = engine_named(plugins, settings.engine)
    options = engine.Config()
    engine.check(options)
    session = engine.start(model, getattr(model, "name_or_path", ""), tokenizer, options)
    sampling = Sampling(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature or 1.0,
        greedy=settings.temperature == 0,
        seed=settings.seed,
    )
    try:
        with context.progress(len(prompt_ids), "prompts", what="scoring") as bar:
            generated = generate_in_chunks(session, prompt_ids, sampling, bar)
    finally:
        session.close()
    responses = [tokenizer.decode(r, skip_special_tokens=True) for r in generated]
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompt_ids]
    scores = rule.score(texts, responses, columns_of(prompts))
    return {"task_score": statistics.fmean(scores), "task_score_std": statistics.pstdev(scores)}
