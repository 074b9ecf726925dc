"""``grpo``: group relative policy optimisation, for rewards a rule can check (RL with verifiable rewards).

Shao et al. 2024 (DeepSeekMath), on align's online-RL loop (:mod:`align.rl.loop`): ``num_generations``
responses per prompt, each response's advantage its reward against its group's (no critic), one clipped
update per batch by default, and TRL's defaults otherwise: no KL term (``beta: 0``, so no reference model
is loaded), token-level loss aggregation (DAPO). ``clip_range_high: 0.28`` is DAPO's clip-higher;
``estimator_options: {scale_rewards: none}`` with ``loss_aggregation: constant`` is Dr. GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass

from align import hookimpl
from align.peft_method import LearningRates, learning_rate_setting
from align.rl.loop import OnlineRLSettings, OnlineRLStage
from align.schema import setting
from align.stage import Stage

RATES = LearningRates(
    1e-6, "TRL's GRPOConfig", 1e-5, "LLaMA-Factory's examples/train_lora/llama3_lora_ppo.yaml, its online-RL example"
)


@dataclass
class GRPOSettings(OnlineRLSettings):
    advantage_estimator: str = setting("grpo", help="How rewards become advantages (grpo: group-normalised).")
    num_generations: int = setting(8, help="Responses sampled per prompt: the group each is compared with.", minimum=2)
    batch_size: int = setting(8, help="Prompts per iteration on each process.", minimum=1)
    mini_batch_size: int | None = setting(
        None, help="Responses per optimizer step (None: the whole iteration's responses).", minimum=1
    )
    ppo_epochs: int = setting(1, help="Passes over each iteration's responses (GRPO's μ).", minimum=1)
    # TRL's GRPOConfig: learning rate 1e-6, beta 0, no KL penalty in the reward, no whitening.
    learning_rate: float | None = learning_rate_setting(
        RATES, "Learning rate (Adam, eps 1e-5, linear decay over steps)"
    )
    kl_coef: float = setting(
        0.0, help="Weight of a per-token KL penalty in the reward (GRPO puts it in the loss).", minimum=0
    )
    beta: float = setting(
        0.0, help="Weight of the k3 KL-to-reference term in the loss; 0 loads no reference model.", minimum=0
    )
    whiten_advantages: bool = setting(False, help="Also normalise advantages over the whole batch.")


class GRPOStage(OnlineRLStage):
    """GRPO: group-relative advantages from reward functions and/or a reward model, no critic."""

    name = "grpo"
    learning_rates = RATES
    Config = GRPOSettings


@hookimpl
def align_register_stages() -> list[Stage]:
    return [GRPOStage()]
