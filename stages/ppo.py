"""``ppo``: proximal policy optimisation from a reward model and/or reward functions.

InstructGPT's PPO (Ouyang et al. 2022) as "The N Implementation Details of RLHF with PPO" (Huang et al.
2023) describes it, on align's online-RL loop (:mod:`align.rl.loop`): one response per prompt, a critic
(initialised from the reward model) and GAE, the KL to the reference as a per-token penalty in the reward,
whitened advantages, four epochs of clipped updates per batch. TRL no longer ships a PPO trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from align import hookimpl
from align.rl.loop import OnlineRLSettings, OnlineRLStage
from align.schema import setting
from align.stage import Stage


@dataclass
class PPOSettings(OnlineRLSettings):
    advantage_estimator: str = setting(
        "gae", help="How rewards become advantages: gae (trains a critic), or another registered estimator."
    )


class PPOStage(OnlineRLStage):
    """PPO from a reward model and/or reward functions, on align's online-RL loop."""

    name = "ppo"
    Config = PPOSettings


@hookimpl
def align_register_stages() -> list[Stage]:
    return [PPOStage()]
