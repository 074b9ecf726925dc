"""``dpo``: direct preference optimisation (Rafailov et al. 2023), with TRL's DPOTrainer.

The policy starts from the stage's input (the latest earlier policy, or the base model in a DPO-only
recipe) and the reference is that same input, frozen: a second copy for full fine-tuning, the policy with
its adapter switched off for LoRA. At the first step the two agree, so the sigmoid loss is ln 2. The stage
reports reward accuracy (how often the chosen reply gains more than the rejected one) and the margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from align import AlignError, hookimpl
from align.kinds import PREFERENCES
from align.peft_method import LearningRates, learning_rate_setting
from align.schema import setting
from align.stage import BASE, POLICY, Input, Stage
from align.training import PolicyTrainingSettings, TRLStage, held_out_setting, trl_class

if TYPE_CHECKING:
    from align.plugin_manager import AlignPluginManager
    from align.recipe import Recipe

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


RATES = LearningRates(1e-6, "TRL's DPOConfig", 5e-6, "LLaMA-Factory's examples/train_lora/qwen3_lora_dpo.yaml")


@dataclass
class DPOSettings(PolicyTrainingSettings):
    learning_rate: float | None = learning_rate_setting(RATES)
    # beta 0.1: TRL's default and the value behind ../shared/external/reference_values (dpo_loss_worked_example).
    beta: float = setting(
        0.1,
        help="How far the policy may move from the reference: higher keeps it closer. For ipo it is the regulariser τ.",
        above=0,
    )
    loss_type: list[LossType] = setting(
        default_factory=lambda: ["sigmoid"],
        help="The preference loss: sigmoid (DPO), ipo, hinge (SLiC), robust (label noise), bco_pair, "
        "sppo_hard, nca_pair, aot, apo_zero, apo_down, discopop, exo_pair, sigmoid_norm; several are summed.",
    )
    # Below 0.5: the robust loss divides by 1 - 2ε, and a label flipped more often than not is the other label.
    label_smoothing: float = setting(
        0.0, help="Share of preference labels assumed flipped (robust, exo_pair).", minimum=0, below=0.5
    )
    eval_size: float = held_out_setting()
    loss_weights: list[float] | None = setting(
        None, help="Weights of the loss types, one per entry of loss_type (default: 1 each).", minimum=0
    )


class DPOStage(TRLStage):
    """Direct preference optimisation (TRL DPOTrainer) against the frozen input policy."""

    name = "dpo"
    learning_rates = RATES
    Config = DPOSettings
    trainer, trainer_config = "DPOTrainer", "DPOConfig"
    data_kind = PREFERENCES
    reference = True
    inputs = {"policy": Input("the policy to align; also the frozen reference", artifact=POLICY, default=(BASE,))}
    metrics = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
    key_metrics = ("loss", "reward_accuracy", "task_score")
    version = "2"

    def check(self, config: DPOSettings, recipe: Recipe, plugins: AlignPluginManager) -> None:
        super().check(config, recipe, plugins)
        # What DPOConfig and DPOTrainer would refuse only when the stage starts, after earlier stages trained.
        where = next(f"stages.{name}" for name, spec in recipe.stages.items() if spec.config is config)
        if config.loss_weights is not None and len(config.loss_weights) != len(config.loss_type):
            weights, types = len(config.loss_weights), len(config.loss_type)
            raise AlignError(
                f"'{where}.loss_weights' has {weights} weight{'s' * (weights != 1)} for {types} "
                f"loss type{'s' * (types != 1)} ({', '.join(config.loss_type)})",
                hint="give one weight per entry of loss_type, in the same order",
            )
        if "exo_pair" in config.loss_type and config.label_smoothing == 0:
            raise AlignError(
                f"'{where}.label_smoothing' must be above 0 for the exo_pair loss",
                hint="the EXO paper recommends label_smoothing: 1.0e-3",
            )

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
