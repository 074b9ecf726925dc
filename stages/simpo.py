"""``simpo``: simple preference optimisation (Meng et al. 2024), on TRL's CPOTrainer.

SimPO needs no reference model: the reward of a reply is β times its mean log-likelihood per token, and
the loss asks the chosen reply's reward to beat the rejected one's by a target margin γ. TRL implements
it as the ``simpo`` loss of its CPO trainer; ``cpo_alpha`` 0 drops CPO's extra likelihood term.
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
    "TRL's CPOConfig",
    5e-6,
    "LLaMA-Factory's examples/train_lora/qwen3_lora_dpo.yaml, whose pref_loss may be simpo",
)


@dataclass
class SimPOSettings(PolicyTrainingSettings):
    learning_rate: float | None = learning_rate_setting(RATES)
    beta: float = setting(
        0.1,
        help="Scale of the reward, β times the mean log-likelihood per token of a reply (TRL's CPOConfig "
        "default, 0.1; the SimPO paper uses 2 to 10).",
        above=0,
    )
    simpo_gamma: float = setting(
        0.5,
        help="Target reward margin γ for the SimPO loss: the chosen reply's reward should exceed the rejected "
        "one's by at least this much (TRL's default, 0.5; the paper uses 0.3 to 1.6).",
        minimum=0,
    )
    eval_size: float = held_out_setting()


class SimPOStage(TRLStage):
    """Simple preference optimisation (SimPO; Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward"), on TRL's CPOTrainer (loss_type simpo, cpo_alpha 0).

    The implicit reward of a reply is its mean log-likelihood per token times β, with no reference model;
    the loss is -log σ(reward(chosen) - reward(rejected) - γ), so the chosen reply must win by the target
    margin γ. Averaging over tokens keeps the policy from favouring long replies.
    """

    name = "simpo"
    learning_rates = RATES
    fused_head = False  # TRL builds its whole logits
    Config = SimPOSettings
    trainer, trainer_config = "CPOTrainer", "CPOConfig"
    data_kind = PREFERENCES
    inputs = {"policy": Input("the policy to align", artifact=POLICY, default=(BASE,))}
    metrics = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
    key_metrics = ("loss", "reward_accuracy", "task_score")
    version = "1"

    def trainer_settings(self, config: SimPOSettings) -> dict[str, Any]:
        return {
            "loss_type": "simpo",
            "cpo_alpha": 0.0,  # no behaviour-cloning term: pure SimPO
            "beta": config.beta,
            "simpo_gamma": config.simpo_gamma,
            "remove_unused_columns": False,  # what CPO sets itself, with a warning: its collator needs every column
        }

    def trainer_class(self) -> type:
        class PretokenizedCPOTrainer(PretokenizedPairs, trl_class(self.trainer)):  # type: ignore[misc]
            """CPOTrainer on align's rendered pairs, without tokenizing them again."""

        return PretokenizedCPOTrainer


@hookimpl
def align_register_stages() -> list[Stage]:
    return [SimPOStage()]
