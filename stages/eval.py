"""``eval``: evaluate a recipe's policies inside the recipe, with optional gates.

By default it compares every policy the recipe produced before it (every earlier stage whose plugin
produces a policy: sft, ppo, dpo, …) with the ``reference`` (the first of them, else the base model),
judged by the ``reward_model`` (the latest earlier stage producing one, if any), and writes
``results.json``, ``report.md`` and ``report.html`` into its output folder. A recipe may name one
policy (``policy: ppo``) or a list of them. ``min_win_rate`` and ``max_kl`` apply to every policy other
than the reference and fail the run, with a message naming the policy and the gate it missed.

Its metrics (``summary.json``) are every evaluator's headline rows, per policy: ``ppo_win_rate``,
``dpo_reward``, ``sft_perplexity``, …
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align import AlignError, hookimpl
from align.evaluation import EvalSettings
from align.memory import ModelShape, Need
from align.model_options import check_attention
from align.rollout import check_engine, engine_named
from align.schema import setting
from align.stage import BASE, POLICY, REWARD_MODEL, Artifact, Input, Stage, StageContext
from align.trackers import Tracker, report_to_setting

if TYPE_CHECKING:
    from align.plugin_manager import AlignPluginManager
    from align.recipe import Recipe


@dataclass
class EvalStageSettings(EvalSettings):
    min_win_rate: float | None = setting(
        None, help="Fail the run if a policy's win rate is below this.", minimum=0, maximum=1
    )
    max_kl: float | None = setting(
        None, help="Fail the run if a policy's KL to the reference is above this.", minimum=0
    )
    report_to: Tracker | list[Tracker] | None = report_to_setting()


#: The gates: setting → (the metric it reads, whether the metric must be at least the setting, wording).
GATES = {"min_win_rate": ("win_rate", True, "win rate against"), "max_kl": ("kl", False, "KL to")}


class EvalStage(Stage):
    """Evaluate every policy against the reference; gates can fail the run."""

    name = "eval"
    key_metrics = ("win_rate",)
    Config = EvalStageSettings
    version = "2"  # results.json align.eval/2, metrics per policy
    inputs = {
        "policy": Input("the policies to evaluate (one stage or a list)", artifact=POLICY, pick="all"),
        "reference": Input("what every policy is compared with", artifact=POLICY, pick="first", default=(BASE,)),
        "reward_model": Input("the judge of rewards and win rates", artifact=REWARD_MODEL, default=(), optional=True),
    }

    def check(self, config: EvalStageSettings, recipe: Recipe, plugins: AlignPluginManager) -> None:
        key = f"stages.{recipe.spec_of(config).name}"
        check_engine(plugins, recipe, config.engine, {}, f"{key}.engine")
        check_attention(config.attn_implementation, key)
        for name in config.reward_functions:
            plugins.get("reward function", name)
        for name in config.evaluators or []:
            plugins.get("evaluator", name)

    def memory(
        self, config: EvalStageSettings, spec: Any, recipe: Recipe, plugins: AlignPluginManager, shape: ModelShape
    ) -> list[Need]:
        # Every model evaluated stays loaded (float32) until the end, so that each is loaded once.
        policies = spec.inputs["policy"]
        count = (len(policies) if isinstance(policies, list) else 1) + 1 + ("reward_model" in spec.inputs)
        needs = [Need(f"{count} models' weights (policies, reference, judge)", count * shape.parameters * 4)]
        engine = engine_named(plugins, config.engine)
        # Prompts' lengths are not known before they are rendered: 256 tokens of prompt are assumed.
        return needs + engine.memory(engine.Config(), shape, config.samples, 256 + config.max_new_tokens, 4)

    def run(self, context: StageContext) -> Mapping[str, float]:
        from align.evaluation import evaluate_models, write_reports

        config: EvalStageSettings = context.config
        reference = context.inputs["reference"]
        policies = _policies(context)
        judge = context.inputs.get("reward_model")
        models = {reference.producer: reference.path}
        for policy in policies:
            models.setdefault(policy.producer, policy.path)
        results = evaluate_models(
            models,
            reference.path,
            judge.path if judge else None,
            config,
            context.plugins,
            context.recipe.dataset_dir,
            label=context.name,
        )
        write_reports(results, context.output_dir)
        rows = {name: entry["metrics"] for name, entry in results["models"].items()}
        compared = [name for name in models if name != reference.producer]
        for name in compared:
            shown = ", ".join(f"{row['label']} {row['value']:.3f}" for row in rows[name].values() if row["headline"])
            context.logger.info("%s against %s: %s", name, reference.producer, shown or "no headline metrics")
        _gates(config, rows, compared, reference.producer, context)
        return _headline(rows, compared, reference.producer)


def _policies(context: StageContext) -> list[Artifact]:
    """The policies the recipe gives: a list for the default or a list, one artifact for a single name."""
    if "policy" in context.input_groups:
        return list(context.input_groups["policy"])
    return [context.inputs["policy"]]


def _gates(
    config: EvalStageSettings,
    rows: Mapping[str, Mapping[str, Any]],
    compared: list[str],
    reference: str,
    context: StageContext,
) -> None:
    missed = []
    for gate, (metric, at_least, wording) in GATES.items():
        limit = getattr(config, gate)
        if limit is None:
            continue
        for name in compared:
            if metric not in rows[name]:
                raise AlignError(
                    f"gate {gate}: no {metric} was measured for {name}",
                    hint="the evaluator that reports it did not run (a win rate needs a reward model)",
                )
            value = rows[name][metric]["value"]
            if (value < limit) if at_least else (value > limit):
                side = "below" if at_least else "above"
                missed.append(f"{name}'s {wording} {reference} is {value:.3f}, {side} {gate} {limit}")
    if missed:
        raise AlignError(
            "gate missed: " + "; ".join(missed),
            hint=f"the report is in {context.output_dir}/report.md (kept in the work folder)",
        )


def _headline(rows: Mapping[str, Mapping[str, Any]], compared: list[str], reference: str) -> dict[str, float]:
    """``MODEL_METRIC`` for every row flagged as headline: metric by metric across the compared policies,
    then the reference's (the summary line shows the first few)."""
    found = {}
    for group in (compared, [reference]):
        names = dict.fromkeys(metric for name in group for metric, row in rows[name].items() if row["headline"])
        for metric in names:
            for name in group:
                if metric in rows[name] and rows[name][metric]["headline"]:
                    found[f"{name}_{metric}"] = float(rows[name][metric]["value"])
    return found


@hookimpl
def align_register_stages() -> list[Stage]:
    return [EvalStage()]
