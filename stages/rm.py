"""``rm``: a reward model trained on preference pairs, with TRL's RewardTrainer.

The model is the input policy (the ``sft`` output by default) with a one-output head, trained so that
the chosen reply scores above the rejected one (Bradley-Terry). The stage reports its accuracy on
held-out pairs: the share of pairs it ranks the right way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import hookimpl
from align.prepare import data_files
from align.schema import setting
from align.stage import BASE, Input, Stage, StageContext
from align.training import TrainingSettings


@dataclass
class RMSettings(TrainingSettings):
    learning_rate: float = setting(1e-5, help="Peak learning rate (TRL's RewardConfig default, 1e-5).")
    eval_size: float = setting(
        0.1,
        help="Pairs held out from the data to measure the model's accuracy: a fraction "
        "below 1 or a count. Applies to datasets that do not set their own eval_size.",
    )
    center_rewards: float | None = setting(
        None,
        help="Push the mean reward towards 0 with this coefficient (Eisenstein et al. 2023 use 0.01), so "
        "that scores are comparable across runs; off by default.",
    )


class RMStage(Stage):
    """A reward model from preference pairs (TRL RewardTrainer), with held-out accuracy."""

    name = "rm"
    Config = RMSettings
    inputs = {"policy": Input("the model the reward model starts from", default=("sft", BASE))}
    passthrough = "trl:RewardConfig"

    def data_files(self, config: RMSettings, recipe: Any) -> list[Path]:
        return data_files(config.data, recipe.dataset_dir)

    def run(self, context: StageContext) -> Mapping[str, float]:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        from align.training import (
            common_arguments,
            final_metrics,
            load_for_training,
            load_tokenizer,
            prepare_data,
            save,
            train,
            trainer_config,
        )

        config: RMSettings = context.config
        tokenizer = load_tokenizer(context)
        data = prepare_data(context, tokenizer, "preference", default_eval_size=config.eval_size)
        train_rows = _pairs(data.train)
        held_out = {name: Dataset.from_dict(_pairs(rows)) for name, rows in data.held_out.items()}

        args = trainer_config(
            RewardConfig,
            context,
            **common_arguments(config, bool(held_out)),
            center_rewards_coefficient=config.center_rewards,
        )
        trainer = RewardTrainer(
            model=load_for_training(context, "policy", "reward"),
            args=args,
            train_dataset=Dataset.from_dict(train_rows),
            eval_dataset=held_out or None,
            processing_class=tokenizer,
        )
        result = train(trainer, context)
        metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step)}
        metrics.update(final_metrics(trainer, {"accuracy": "train_accuracy", "margin": "train_margin"}))
        if held_out:
            evaluated = trainer.evaluate()
            metrics.update({k: float(v) for k, v in evaluated.items() if k.endswith(("_accuracy", "_margin", "_loss"))})
            accuracies = [v for k, v in evaluated.items() if k.endswith("_accuracy")]
            metrics["eval_accuracy"] = sum(accuracies) / len(accuracies)
        save(trainer, tokenizer, context)
        return metrics


def _pairs(rows: Mapping[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Prompt + reply token ids for each side, as RewardTrainer takes them."""
    return {
        "chosen_ids": [p + c for p, c in zip(rows["prompt_ids"], rows["chosen_ids"], strict=True)],
        "rejected_ids": [p + r for p, r in zip(rows["prompt_ids"], rows["rejected_ids"], strict=True)],
    }


@hookimpl
def align_register_stages() -> list[Stage]:
    return [RMStage()]
