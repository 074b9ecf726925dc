"""``dpo``: direct preference optimisation (Rafailov et al. 2023), with TRL's DPOTrainer.

The policy starts from the stage's input (the latest earlier policy, or the base model in a DPO-only
recipe) and the reference is that same input, frozen: a second copy for full fine-tuning, the policy with
its adapter switched off for LoRA. At the first step the two agree, so the sigmoid loss is ln 2. The stage
reports reward accuracy (how often the chosen reply gains more than the rejected one) and the margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from align import hookimpl
from align.kinds import PREFERENCES
from align.schema import setting
from align.stage import BASE, POLICY, Input, Stage
from align.training import PolicyTrainingSettings, TRLStage, trl_class

LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


@dataclass
class DPOSettings(PolicyTrainingSettings):
    learning_rate: float = setting(1e-6, help="Peak learning rate (TRL's DPOConfig default, 1e-6).")
    # beta 0.1: TRL's default and the value behind ../shared/external/reference_values (dpo_loss_worked_example).
    beta: float = setting(
        0.1,
        help="How far the policy may move from the reference: higher keeps it closer. For ipo it is the regulariser τ.",
    )
    loss_type: list[LossType] = setting(
        default_factory=lambda: ["sigmoid"],
        help="The preference loss: sigmoid (DPO), ipo, hinge (SLiC), robust (label noise), bco_pair, "
        "sppo_hard, nca_pair, aot, apo_zero, apo_down, discopop, exo_pair, sigmoid_norm; several are summed.",
    )
    label_smoothing: float = setting(0.0, help="Share of preference labels assumed flipped (robust, exo_pair).")
    eval_size: float = setting(
        0.0,
        help="Pairs held out from each dataset that sets no eval_size of its own, "
        "for held-out reward accuracy: a fraction below 1 or a count.",
    )
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the loss types."})


class DPOStage(TRLStage):
    """Direct preference optimisation (TRL DPOTrainer) against the frozen input policy."""

    name = "dpo"
    Config = DPOSettings
    trainer, trainer_config = "DPOTrainer", "DPOConfig"
    data_kind = PREFERENCES
    reference = True
    inputs = {"policy": Input("the policy to align; also the frozen reference", artifact=POLICY, default=(BASE,))}
    metrics = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
    version = "2"

    def trainer_settings(self, config: DPOSettings) -> dict[str, Any]:
        return {
            "beta": config.beta,
            "loss_type": list(config.loss_type),
            "label_smoothing": config.label_smoothing,
            "loss_weights": config.loss_weights,
        }

    def trainer_class(self) -> type:
        class PretokenizedDPOTrainer(trl_class(self.trainer)):  # type: ignore[misc]
            """DPOTrainer on align's rendered pairs (prompt_ids, chosen_ids, rejected_ids): no tokenization."""

            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset

        return PretokenizedDPOTrainer


@hookimpl
def align_register_stages() -> list[Stage]:
    return [DPOStage()]
