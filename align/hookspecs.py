"""The plugin contract: every hook align calls, documented where it is declared.

A plugin is a module (or object) with functions named after the specs below and marked with
``@align.hookimpl``. It reaches align through the ``align`` entry-point group of its package, through
``align -p module.name``, or as a ``.py`` file in ``--plugins-dir``. align's own stages and plugins are
found the same way; the core never imports one by name.

An implementation may accept fewer arguments than its spec names, so a spec can gain arguments without
breaking old plugins. Unless a spec says "first result wins", align calls every implementation and uses
every non-``None`` result.

Registration hooks return objects that align keys by their ``name`` attribute. Two plugins that
register one name in the same kind are an error naming both plugins. Registration hooks are called when
align starts (also by ``align plugins``), so keep them cheap: import torch and friends inside the
registered objects' methods, not at module level.
"""

# Specs have no bodies: pluggy calls the implementations, never these.
# mypy: disable-error-code="empty-body"
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from align.chat_template import ChatTemplate
    from align.dataformat import DatasetFormat
    from align.evaluation import Evaluator
    from align.kinds import DataKind
    from align.model_source import ModelSource
    from align.peft_method import PeftMethod
    from align.plugin_manager import AlignPluginManager
    from align.recipe import Recipe
    from align.reward import RewardFunction
    from align.rl.advantages import AdvantageEstimator
    from align.rollout import RolloutEngine
    from align.runner import RunSummary
    from align.stage import Stage, StageContext, StageOutcome
    from align.trackers import ExperimentTracker

hookspec = pluggy.HookspecMarker("align")


# ---------------------------------------------------------------------------------------------------
# Registration: what a plugin adds to align
# ---------------------------------------------------------------------------------------------------


@hookspec
def align_register_stages() -> Sequence[Stage]:
    """Register pipeline stages (training algorithms and other steps of a recipe).

    A recipe names a stage's plugin with ``plugin:`` (or by giving the stage the plugin's name).

    :returns: :class:`align.stage.Stage` instances. Each declares its ``name``, its settings schema
        (``Config``, a dataclass), the artifacts it consumes by role (``inputs``) and its ``run`` method.
    """


@hookspec
def align_register_model_sources() -> Sequence[ModelSource]:
    """Register model sources: named ways to obtain a base model and its tokenizer.

    A recipe's ``model:`` is either a registered source's name (``model: tiny-llama``), a mapping with
    ``source:`` and that source's settings, or a local folder or hub id, which the built-in ``path``
    source handles.

    :returns: :class:`align.model_source.ModelSource` instances.
    """


@hookspec
def align_register_dataset_formats() -> Sequence[DatasetFormat]:
    """Register dataset formats: converters from a file's rows to align's canonical examples.

    A registry entry's ``formatting`` (or a stage's ``format:``) selects one by name; a file without
    either is matched by each format's ``detect``.

    :returns: :class:`align.dataformat.DatasetFormat` instances (``alpaca``, ``sharegpt``, …).
    """


@hookspec
def align_register_data_kinds() -> Sequence[DataKind]:
    """Register data kinds: the shapes of data a stage trains on, and how rows of one kind become another.

    A stage names the kind it takes (``data_kind = "feedback"``); a dataset-format plugin names the kinds
    it can produce (``kinds``). align's own kinds are ``conversations`` (SFT), ``preferences`` (a prompt
    with a chosen and a rejected reply), ``feedback`` (one reply marked desirable or not, as KTO takes it)
    and ``prompts`` (with the row's other columns, such as a reference answer). A kind may convert rows
    of another (``preferences`` → ``feedback`` gives each pair's two replies, one desirable and one not).

    :returns: :class:`align.kinds.DataKind` instances.
    """


@hookspec
def align_register_peft_methods() -> Sequence[PeftMethod]:
    """Register PEFT methods: how a training stage makes its model trainable.

    A stage's ``peft: {method: lora, r: 16}`` selects one by name; the other keys are validated against
    the method's ``Config`` when the recipe is loaded, and ``check`` may refuse the method there (qlora
    without CUDA, say).

    :returns: :class:`align.peft_method.PeftMethod` instances (``full``, ``freeze``, ``lora``, …).
    """


@hookspec
def align_register_rollout_engines() -> Sequence[RolloutEngine]:
    """Register rollout engines: ways to generate responses from a policy during PPO and evaluation.

    A stage's ``engine: NAME`` selects one and ``engine_options`` are validated against its ``Config``.
    The engine is started once per stage and told after every policy update (``sync``).

    :returns: :class:`align.rollout.RolloutEngine` instances (``hf``, ``vllm``, …).
    """


@hookspec
def align_register_reward_functions() -> Sequence[RewardFunction]:
    """Register rule-based reward functions, scoring a prompt and response without a reward model.

    An online-RL stage's ``reward_functions`` list (names, or ``{function, weight, options}``), an
    evaluation's ``reward_functions`` and a ``score:`` setting's ``reward_function`` select them by name.
    Each is called with the prompts and responses as text and the prompt rows' other columns as keyword
    arguments (``answer=[…]``); its ``Config`` takes the recipe's ``options``.

    :returns: :class:`align.reward.RewardFunction` instances (``sentiment``, ``exact_answer``, …).
    """


@hookspec
def align_register_advantage_estimators() -> Sequence[AdvantageEstimator]:
    """Register advantage estimators: how the online-RL loop turns rewards into per-token advantages.

    An online-RL stage's ``advantage_estimator: NAME`` selects one (``ppo``, ``grpo`` and ``rloo`` each
    default to their own) and ``estimator_options`` are validated against its ``Config`` when the recipe
    loads. The estimator's ``needs_critic`` decides whether a value model trains; ``needs_groups`` that
    ``num_generations`` must be at least 2.

    :returns: :class:`align.rl.advantages.AdvantageEstimator` instances (``gae``, ``grpo``, ``rloo``, …).
    """


@hookspec
def align_register_evaluators() -> Sequence[Evaluator]:
    """Register evaluators: measurements of a checkpoint made by ``align eval`` and the eval stage.

    Every registered evaluator that applies (``applies``: a reward model given, held-out data given, …)
    runs, unless an evaluation's ``evaluators`` list names a subset. Each returns typed rows
    (:class:`align.evaluation.Metric`: a value, and optionally a confidence interval, a count and the
    per-response samples), which ``results.json``, ``report.md`` and ``report.html`` show without
    knowing the evaluator.

    :returns: :class:`align.evaluation.Evaluator` instances (``reward_model``, ``kl``, ``perplexity``, …).
    """


@hookspec
def align_register_chat_templates() -> Sequence[ChatTemplate]:
    """Register chat templates by name: Jinja text or ``.jinja`` files, not code that builds prompts.

    A stage's ``chat_template: NAME`` picks one (a name is looked up first, then a file, then template
    text); the template replaces the tokenizer's and is saved with the checkpoint. An unknown name is an
    error when the recipe is checked.

    :returns: :class:`align.chat_template.ChatTemplate` instances (``chatml``, ``llama3``, ``qwen2``, …).
    """


@hookspec
def align_register_trackers() -> Sequence[ExperimentTracker]:
    """Register experiment trackers: where every stage's metrics are reported besides its metrics file.

    A stage's ``report_to: NAME`` (or a list of names, or ``defaults.report_to`` for every stage) selects
    trackers; left unset, every tracker whose ``fallback`` is true reports. A name no tracker has, or a
    tracker whose ``missing()`` package is not installed, is refused when the recipe loads. In the run's
    first process only, align ``open``-s each of a stage's trackers before the stage runs, hands the run
    every row the stage logs (``log(metrics, step)``) and closes it as the stage ended.

    :returns: :class:`align.trackers.ExperimentTracker` instances (``tensorboard``, ``wandb``, ``mlflow``, …).
    """


# ---------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------


@hookspec
def align_recipe_loaded(recipe: Recipe, plugins: AlignPluginManager) -> None:
    """Called once the recipe is read, overridden from the command line and validated, before any work.

    ``align config`` calls it too, so a check here stops a bad recipe before anything trains. Raise
    :class:`align.AlignError` to refuse a recipe (say, a stage combination your plugin cannot serve, or a
    name no registry knows: ``plugins.get("reward function", name)`` raises with the known names).
    Each stage's own :meth:`align.stage.Stage.check` has run before this hook.

    :param recipe: the resolved recipe. Treat it as read-only.
    :param plugins: the plugin manager, for its registries (``plugins.registry("rollout engine")``).
    """


# ---------------------------------------------------------------------------------------------------
# Stage lifecycle
# ---------------------------------------------------------------------------------------------------


@hookspec
def align_stage_starting(context: StageContext) -> None:
    """Called before a stage runs (not for a stage that is cached).

    :param context: the stage's name, validated settings, inputs and output folder.
    """


@hookspec(firstresult=True)
def align_run_stage(context: StageContext) -> Mapping[str, float] | None:
    """Run one stage. First result wins.

    align's own implementation calls ``context.stage.run(context)`` and is ``trylast``, so this hook is
    mostly for wrappers: implement it with ``@hookimpl(wrapper=True)`` and a single ``yield`` to time,
    trace or guard every stage, the way align's run log does::

        @hookimpl(wrapper=True)
        def align_run_stage(context):
            started = time.perf_counter()
            metrics = yield
            print(context.name, time.perf_counter() - started)
            return metrics

    :param context: the stage about to run.
    :returns: the stage's headline metrics (name → number), recorded in the manifest and summary.
    """


@hookspec
def align_trainer_built(context: StageContext, trainer: Any) -> None:
    """Called by training stages once their trainer exists, before training starts.

    The place to add callbacks (``trainer.add_callback(...)``) or inspect the model.

    :param context: the running stage.
    :param trainer: the stage's trainer (a ``transformers.Trainer`` subclass for the TRL-based stages).
    """


@hookspec
def align_metrics_logged(context: StageContext, step: int | None, metrics: Mapping[str, float]) -> None:
    """Called whenever a stage logs metrics (after align wrote them to the run's metrics file).

    :param context: the running stage.
    :param step: the training step the metrics belong to, or ``None`` for end-of-stage metrics.
    :param metrics: metric name → value.
    """


@hookspec
def align_stage_finished(context: StageContext, outcome: StageOutcome) -> None:
    """Called after a stage ran, succeeded or failed, or was found cached.

    :param context: the stage.
    :param outcome: status (``done``, ``cached`` or ``failed``), seconds taken, metrics, and the
        error message for a failed stage.
    """


@hookspec
def align_run_finished(summary: RunSummary) -> None:
    """Called once at the end of ``align run``, whether it succeeded or not.

    :param summary: what ``summary.json`` holds: the run's status and each stage's outcome.
    """
