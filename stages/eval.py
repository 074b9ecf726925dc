"""``eval``: evaluate a recipe's policies inside the recipe, with optional gates.

By default it compares the ``policy`` (the ppo or dpo output) with the ``reference`` (the sft output),
judged by the ``reward_model`` (the rm output), and writes ``results.json``, ``report.md`` and
``report.html`` into its output folder. ``min_win_rate`` and ``max_kl`` fail the run, with a message
saying which gate was missed, when the policy does not meet them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from align import AlignError, hookimpl
from align.evaluation import EvalSettings
from align.schema import setting
from align.stage import BASE, Input, Stage, StageContext


@dataclass
class EvalStageSettings(EvalSettings):
    min_win_rate: float | None = setting(None, help="Fail the run if the policy's win rate is below this.")
    max_kl: float | None = setting(None, help="Fail the run if the policy's KL to the reference is above this.")


class EvalStage(Stage):
    """Evaluate the policy against the reference; gates can fail the run."""

    name = "eval"
    Config = EvalStageSettings
    inputs = {
        "policy": Input("the policy to evaluate", default=("ppo", "dpo", "sft", BASE)),
        "reference": Input("what the policy is compared with", default=("sft", BASE)),
        "reward_model": Input("the judge of rewards and win rates", default=("rm",), optional=True),
    }

    def run(self, context: StageContext) -> Mapping[str, float]:
        from align.evaluation import evaluate_models, write_reports

        config: EvalStageSettings = context.config
        policy, reference = context.inputs["policy"], context.inputs["reference"]
        judge = context.inputs.get("reward_model")
        models = {reference.producer: reference.path, policy.producer: policy.path}
        results = evaluate_models(
            models, reference.path, judge.path if judge else None, config, context.plugins, context.recipe.dataset_dir
        )
        write_reports(results, context.output_dir)
        found = results["models"][policy.producer]
        metrics = _headline(found)
        if config.min_win_rate is not None and found.get("win_rate", 0.0) < config.min_win_rate:
            raise AlignError(
                f"gate missed: {policy.producer}'s win rate against {reference.producer} is "
                f"{found.get('win_rate', 0.0):.3f}, below min_win_rate {config.min_win_rate}",
                hint=f"the report is in {context.output_dir}/report.md (kept in the work folder)",
            )
        if config.max_kl is not None and found.get("kl", 0.0) > config.max_kl:
            raise AlignError(
                f"gate missed: {policy.producer}'s KL to {reference.producer} is {found['kl']:.3f}, above "
                f"max_kl {config.max_kl}",
                hint=f"the report is in {context.output_dir}/report.md (kept in the work folder)",
            )
        return metrics


def _headline(found: Mapping[str, Any]) -> dict[str, float]:
    metrics = {}
    if "win_rate" in found:
        metrics["win_rate"] = found["win_rate"]
    if "reward" in found:
        metrics["reward"] = found["reward"]["mean"]
    for key in ("kl", "response_length", "perplexity"):
        if key in found:
            metrics[key] = found[key]
    for rule, value in (found.get("reward_functions") or {}).items():
        metrics[rule] = value
    return metrics


@hookimpl
def align_register_stages() -> list[Stage]:
    return [EvalStage()]
