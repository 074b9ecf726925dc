"""``dpo``: direct preference optimisation (Rafailov et al. 2023), with TRL's DPOTrainer.

The policy starts from the stage's input (the ``sft`` output, or the base model in a DPO-only recipe) and
the reference is that same input, frozen: a second copy for full fine-tuning, the policy with its adapter
switched off for LoRA. At the first step the two agree, so the sigmoid loss is ln 2. The stage reports
reward accuracy (how often the chosen reply gains more than the rejected one) and the reward margin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align import hookimpl
from align.prepare import data_files
from align.schema import setting
from align.stage import BASE, Input, Stage, StageContext
from align.task_score import ScoreSettings, score_setting
from align.training import TrainingSettings

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
class DPOSettings(TrainingSettings):
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
    score: ScoreSettings | None = score_setting()


class DPOStage(Stage):
    """Direct preference optimisation (TRL DPOTrainer) against the frozen input policy."""

    name = "dpo"
    Config = DPOSettings
    inputs = {"policy": Input("the policy to align; also the frozen reference", default=("sft", BASE))}
    passthrough = "trl:DPOConfig"

    def data_files(self, config: DPOSettings, recipe: Any) -> list[Path]:
        return data_files(config.data, recipe.dataset_dir)

    def run(self, context: StageContext) -> Mapping[str, float]:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from align.models import load_model
        from align.training import (
            common_arguments,
            final_metrics,
            load_for_training,
            load_tokenizer,
            loss_metrics,
            prepare_data,
            save,
            train,
            trainer_config,
        )

        class PretokenizedDPOTrainer(DPOTrainer):
            """DPOTrainer on align's rendered pairs: TRL's own tokenization is skipped."""

            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset

        config: DPOSettings = context.config
        tokenizer = load_tokenizer(context)
        data = prepare_data(context, tokenizer, "preference", default_eval_size=config.eval_size)
        held_out = {name: Dataset.from_dict(rows) for name, rows in data.held_out.items()}

        args = trainer_config(
            DPOConfig,
            context,
            **common_arguments(config, bool(held_out)),
            beta=config.beta,
            loss_type=list(config.loss_type),
            label_smoothing=config.label_smoothing,
            loss_weights=config.loss_weights,
        )
        policy = load_for_training(context, "policy", "causal")
        # With an adapter the reference is the policy with its adapter off; otherwise a frozen copy.
        reference = None if hasattr(policy, "peft_config") else load_model(context.inputs["policy"].path)
        trainer = PretokenizedDPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_dict(data.train),
            eval_dataset=held_out or None,
            processing_class=tokenizer,
        )
        metrics = loss_metrics(trainer, train(trainer, context))
        metrics.update(
            final_metrics(trainer, {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"})
        )
        if held_out:
            evaluated = trainer.evaluate()
            metrics.update(
                {
                    k.replace("rewards/", "reward_"): float(v)
                    for k, v in evaluated.items()
                    if k.endswith(("rewards/accuracies", "rewards/margins", "_loss"))
                }
            )
        if config.score is not None:
            from align.task_score import task_score

            metrics.update(task_score(trainer.model, tokenizer, config.score, context))
        save(trainer, tokenizer, context)
        return metrics


@hookimpl
def align_register_stages() -> list[Stage]:
    return [DPOStage()]
