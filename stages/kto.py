"""``kto``: Kahneman-Tversky optimisation (Ethayarajh et al. 2024), with TRL's KTOTrainer.

KTO learns from single replies marked desirable or not, so it takes ``feedback`` data (LLaMA-Factory's
``kto_tag`` column) and preference pairs alike (each pair gives one desirable and one undesirable reply).
The reference is the input policy, frozen. The stage reports the implied rewards of desirable and
undesirable replies, their margin and the KL estimate that KTO uses as its reference point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from align import hookimpl
from align.kinds import FEEDBACK
from align.peft_method import LearningRates, learning_rate_setting
from align.schema import setting
from align.stage import BASE, POLICY, Input, Stage
from align.training import PolicyTrainingSettings, TRLStage, held_out_setting, trl_class

logger = logging.getLogger("align")


RATES = LearningRates(1e-6, "TRL's KTOConfig", 5e-6, "LLaMA-Factory's examples/train_lora/qwen3_lora_kto.yaml")


@dataclass
class KTOSettings(PolicyTrainingSettings):
    learning_rate: float | None = learning_rate_setting(RATES)
    beta: float = setting(
        0.1,
        help="Parameter controlling the deviation from the reference model. Higher β means less deviation from "
        "the reference model (TRL's default, 0.1).",
        above=0,
    )
    desirable_weight: float = setting(
        1.0,
        help="Desirable losses are weighed by this factor to counter unequal numbers of desirable and undesirable "
        "replies (TRL's default, 1.0; the paper advises keeping weight × count of the two within 1 to 4/3 of "
        "each other).",
        minimum=0,
    )
    undesirable_weight: float = setting(
        1.0,
        help="Undesirable losses are weighed by this factor, like desirable_weight (TRL's default, 1.0).",
        minimum=0,
    )
    eval_size: float = held_out_setting()


class KTOStage(TRLStage):
    """Kahneman-Tversky optimisation (KTO; Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization"), with TRL's KTOTrainer.

    Each reply is marked desirable or undesirable, on its own: no pairs are needed. The implied reward of a
    reply is β times the log-ratio of the policy's and the frozen reference's likelihoods of it, and KTO
    pushes desirable replies above, and undesirable ones below, a reference point: an estimate of the KL
    divergence between policy and reference, taken from mismatched prompt-reply pairs of the same batch.
    Preference pairs are accepted and give one reply of each kind. The reference is the input policy
    (for a LoRA policy, the policy with its adapter switched off).
    """

    name = "kto"
    learning_rates = RATES
    Config = KTOSettings
    trainer, trainer_config = "KTOTrainer", "KTOConfig"
    data_kind = FEEDBACK
    reference = True
    inputs = {"policy": Input("the policy to align; also the frozen reference", artifact=POLICY, default=(BASE,))}
    metrics = {
        "rewards/chosen": "reward_desirable",
        "rewards/rejected": "reward_undesirable",
        "rewards/margins": "reward_margin",
        "kl": "kl",
    }
    key_metrics = ("loss", "reward_margin", "kl", "task_score")
    version = "1"

    def trainer_settings(self, config: KTOSettings) -> dict[str, Any]:
        return {
            "beta": config.beta,
            "desirable_weight": config.desirable_weight,
            "undesirable_weight": config.undesirable_weight,
        }

    def trainer_class(self) -> type:
        class PretokenizedKTOTrainer(trl_class(self.trainer)):  # type: ignore[misc]
            """KTOTrainer on align's rendered rows (prompt_ids, completion_ids, label): what TRL's
            ``_prepare_dataset`` does after tokenizing, after one seeded shuffle."""

            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                if "KL_completion_ids" in dataset.column_names:  # evaluate() prepares datasets again
                    return dataset
                # TRL samples in order (train_sampling_strategy "sequential", which the KL pairs need), and
                # the two replies of a pair arrive side by side: shuffled once, the rotation below pairs a
                # prompt with another prompt's reply, as KTO's KL estimate wants, and batches mix both kinds.
                dataset = dataset.shuffle(seed=args.seed)
                if args.max_length is not None:  # a prompt that fills max_length leaves nothing to learn from
                    dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
                if self.calculate_KL:  # (x1, y1), …, (xn, yn) → (x1, yn), (x2, y1), …, (xn, yn-1) per batch

                    def rotate(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
                        ids = rows["completion_ids"]
                        return {**rows, "KL_completion_ids": ids[-1:] + ids[:-1]}

                    dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
                if dataset_name == "train":
                    _warn_if_unbalanced(dataset["label"], self.desirable_weight, self.undesirable_weight)
                return dataset

        return PretokenizedKTOTrainer


def _warn_if_unbalanced(labels: list[bool], desirable_weight: float, undesirable_weight: float) -> None:
    """TRL's warning when the weights do not balance the counts (Eq. 8 of the KTO paper)."""
    desirable = max(sum(labels), 1)
    undesirable = max(len(labels) - desirable, 1)
    if desirable == undesirable:
        return
    low, high = (round(undesirable * undesirable_weight / desirable * f, 2) for f in (1, 1.33))
    low_u, high_u = (round(desirable * desirable_weight / undesirable / f, 2) for f in (1.33, 1))
    if not (low <= desirable_weight <= high or low_u <= undesirable_weight <= high_u):
        logger.warning(
            f"  kto: {desirable} desirable and {undesirable} undesirable replies; set desirable_weight in "
            f"[{low}, {high}] or undesirable_weight in [{low_u}, {high_u}] (not both) to balance them"
        )


@hookimpl
def align_register_stages() -> list[Stage]:
    return [KTOStage()]
