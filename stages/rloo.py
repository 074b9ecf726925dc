"""``rloo``: REINFORCE leave-one-out (Ahmadian et al. 2024), on align's online-RL loop.

``num_generations`` responses per prompt; each response's baseline is the mean reward of the others to
the same prompt (no critic). As in TRL's RLOOTrainer, the KL to the reference is a penalty in the reward
(``kl_coef``) and each batch is used for one update.
"""

from __future__ import annotations

from dataclasses import dataclass

from align import hookimpl
from align.peft_method import LearningRates, learning_rate_setting
from align.rl.loop import OnlineRLSettings, OnlineRLStage
from align.schema import setting
from align.stage import Stage

RATES = LearningRates(
    1e-6, "TRL's RLOOConfig", 1e-5, "LLaMA-Factory's examples/train_lora/llama3_lora_ppo.yaml, its online-RL example"
)


@dataclass
class RLOOSettings(OnlineRLSettings):
    advantage_estimator: str = setting("rloo", help="How rewards become advantages (rloo: leave-one-out).")
    num_generations: int = setting(
        4, help="Responses sampled per prompt: each one's baseline is the others.", minimum=2
    )
    batch_size: int = setting(8, help="Prompts per iteration on each process.", minimum=1)
    mini_batch_size: int | None = setting(
        None, help="Responses per optimizer step (None: the whole iteration's responses).", minimum=1
    )
    ppo_epochs: int = setting(1, help="Passes over each iteration's responses.", minimum=1)
    # TRL's RLOOConfig: learning rate 1e-6, KL 0.05 in the reward, no whitening.
    learning_rate: float | None = learning_rate_setting(
        RATES, "Learning rate (Adam, eps 1e-5, linear decay over steps)"
    )
    whiten_advantages: bool = setting(False, help="Also normalise advantages over the whole batch.")


class RLOOStage(OnlineRLStage):
    """RLOO: leave-one-out baselines from reward functions and/or a reward model, no critic."""

    name = "rloo"
    learning_rates = RATES
    Config = RLOOSettings


@hookimpl
def align_register_stages() -> list[Stage]:
    return [RLOOStage()]
