"""``rm``: a reward model trained on preference pairs, with TRL's RewardTrainer.

The model is the input policy (the latest earlier policy, else the base model) with a one-output head,
trained so that the chosen reply scores above the rejected one (Bradley-Terry). The stage reports its
accuracy on held-out pairs: the share of pairs it ranks the right way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from align import hookimpl
from align.kinds import PREFERENCES
from align.peft_method import LearningRates, learning_rate_setting
from align.schema import setting
from align.stage import BASE, POLICY, REWARD_MODEL, Input, Stage
from align.training import TrainingSettings, TRLStage, held_out_setting

RATES = LearningRates(1e-5, "TRL's RewardConfig", 1e-4, "LLaMA-Factory's examples/train_lora/qwen3_lora_reward.yaml")


@dataclass
class RMSettings(TrainingSettings):
    learning_rate: float | None = learning_rate_setting(RATES)
    eval_size: float = held_out_setting(0.1)
    center_rewards: float | None = setting(
        None,
        help="Push the mean reward towards 0 with this coefficient (Eisenstein et al. 2023 use 0.01), so "
        "that scores are comparable across runs; off by default.",
        minimum=0,
    )


class RMStage(TRLStage):
    """A reward model from preference pairs (TRL RewardTrainer), with held-out accuracy."""

    name = "rm"
    learning_rates = RATES
    Config = RMSettings
    trainer, trainer_config = "RewardTrainer", "RewardConfig"
    data_kind = PREFERENCES
    model_kind = "reward"
    produces = REWARD_MODEL
    inputs = {"policy": Input("the model the reward model starts from", artifact=POLICY, default=(BASE,))}
    metrics = {"accuracy": "accuracy", "margin": "margin"}
    key_metrics = ("loss", "accuracy")
    version = "2"

    def trainer_settings(self, config: RMSettings) -> dict[str, Any]:
        return {"center_rewards_coefficient": config.center_rewards}

    def dataset(self, rows: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Prompt + reply token ids for each side, as RewardTrainer takes them."""
        return {
            "chosen_ids": [p + c for p, c in zip(rows["prompt_ids"], rows["chosen_ids"], strict=True)],
            "rejected_ids": [p + r for p, r in zip(rows["prompt_ids"], rows["rejected_ids"], strict=True)],
        }


@hookimpl
def align_register_stages() -> list[Stage]:
    return [RMStage()]
