"""``sft``: supervised fine-tuning on conversations, with TRL's SFTTrainer.

align renders and masks the data itself (:mod:`align.prepare`): every assistant turn is trained on and
nothing else, for any chat template; long conversations lose their oldest exchanges first; every
skipped, truncated or dropped row is counted. TRL then trains on the token ids. The output is a Hugging
Face checkpoint (or, with a PEFT adapter, the adapter) with its tokenizer and chat template, and each
dataset's held-out loss is reported on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import hookimpl
from align.prepare import data_files
from align.render import padding_waste
from align.schema import setting
from align.stage import Input, Stage, StageContext
from align.task_score import ScoreSettings, score_setting
from align.training import TrainingSettings


@dataclass
class SFTSettings(TrainingSettings):
    learning_rate: float = setting(
        2e-5, help="Peak learning rate (TRL's SFT default, 2e-5). Tiny models want far higher rates than real ones."
    )
    packing: bool = setting(
        False,
        help="Pack several conversations into each sequence of max_length tokens "
        "(best-fit, without attention across conversations): less padding, faster epochs.",
    )
    score: ScoreSettings | None = score_setting()


class SFTStage(Stage):
    """Supervised fine-tuning on conversations (TRL SFTTrainer), loss on assistant turns only."""

    name = "sft"
    Config = SFTSettings
    inputs = {"policy": Input("the model to fine-tune", default=("base",))}
    version = "3"
    passthrough = "trl:SFTConfig"

    def data_files(self, config: SFTSettings, recipe: Any) -> list[Path]:
        return data_files(config.data, recipe.dataset_dir)

    def run(self, context: StageContext) -> Mapping[str, float]:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from align.training import (
            common_arguments,
            load_for_training,
            load_tokenizer,
            loss_metrics,
            prepare_data,
            save,
            train,
            trainer_config,
        )

        config: SFTSettings = context.config
        tokenizer = load_tokenizer(context)
        data = prepare_data(context, tokenizer, "sft")
        held_out = {name: Dataset.from_dict(rows) for name, rows in data.held_out.items()}

        args = trainer_config(SFTConfig, context, **common_arguments(config, bool(held_out)), packing=config.packing)
        trainer = SFTTrainer(
            model=load_for_training(context, "policy", "causal"),
            args=args,
            train_dataset=Dataset.from_dict(data.train),
            eval_dataset=held_out or None,
            processing_class=tokenizer,
        )
        metrics = loss_metrics(trainer, train(trainer, context))
        if held_out:
            metrics.update({k: float(v) for k, v in trainer.evaluate().items() if k.endswith("_loss")})
        metrics["padding_waste"] = padding_waste([len(i) for i in data.train["input_ids"]], config.batch_size)
        if config.score is not None:
            from align.task_score import task_score

            metrics.update(task_score(trainer.model, tokenizer, config.score, context))
        save(trainer, tokenizer, context)
        return metrics


@hookimpl
def align_register_stages() -> list[Stage]:
    return [SFTStage()]
