"""``orpo``: odds-ratio preference optimisation (Hong et al. 2024), with TRL's ORPOTrainer.

ORPO needs no reference model and no separate SFT pass: its loss is the negative log-likelihood of the
chosen side plus λ times a penalty on the log odds ratio of the chosen over the rejected reply.
The stage reports reward accuracy and margin (rewards are β times the mean log-likelihood per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align import hookimpl
from align.kinds import PREFERENCES
from align.peft_method import LearningRates, learning_rate_setting
from align.schema import setting
from align.stage import BASE, POLICY, Input, Stage
from align.training import PolicyTrainingSettings, PretokenizedPairs, TRLStage, held_out_setting, trl_class

RATES = LearningRates(
    1e-6,
    "TRL's ORPOConfig",
    5e-6,
    "LLaMA-Factory's examples/train_lora/qwen3_lora_dpo.yaml, whose pref_loss may be orpo",
)


@dataclass
class ORPOSettings(PolicyTrainingSettings):
    learning_rate: float | None = learning_rate_setting(RATES)
    beta: float = setting(
        0.1,
        help="Parameter controlling the relative ratio loss weight in the ORPO loss: λ of the paper, the weight of "
        "the odds-ratio term against the chosen reply's log-likelihood (TRL's default, 0.1).",
        minimum=0,
    )
    eval_size: float = held_out_setting()


class ORPOStage(TRLStage):
    """Odds-ratio preference optimisation (ORPO; Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"), with TRL's ORPOTrainer.

    One loss does supervised fine-tuning and preference alignment at once: the negative log-likelihood of
    the chosen side (TRL counts the prompt's tokens as well as the reply's) plus λ (`beta`) times
    -log σ(log odds(chosen) - log odds(rejected)), where the odds of a reply are p / (1 - p) for its mean
    per-token likelihood p. There is no reference model, so it can start from the base model as well as
    from an SFT policy.
    """

    name = "orpo"
    learning_rates = RATES
    fused_head = False  # TRL builds its whole logits
    Config = ORPOSettings
    trainer, trainer_config = "ORPOTrainer", "ORPOConfig"
    data_kind = PREFERENCES
    inputs = {"policy": Input("the policy to align", artifact=POLICY, default=(BASE,))}
    metrics = {
        "rewards/accuracies": "reward_accuracy",
        "rewards/margins": "reward_margin",
        "log_odds_ratio": "log_odds_ratio",
        "nll_loss": "nll_loss",
    }
    key_metrics = ("loss", "reward_accuracy", "task_score")
    version = "1"

    def trainer_settings(self, config: ORPOSettings) -> dict[str, Any]:
        # remove_unused_columns: what ORPO sets itself, with a warning: its collator needs every column
        return {"beta": config.beta, "remove_unused_columns": False}

    def trainer_class(self) -> type:
        class PretokenizedORPOTrainer(PretokenizedPairs, trl_class(self.trainer)):  # type: ignore[misc]
            """ORPOTrainer on align's rendered pairs, without tokenizing them again."""

        return PretokenizedORPOTrainer


@hookimpl
def align_register_stages() -> list[Stage]:
    return [ORPOStage()]
