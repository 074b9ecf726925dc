"""``sft``: supervised fine-tuning on conversations, with TRL's SFTTrainer.

align renders and masks the data itself (:mod:`align.prepare`): every assistant turn is trained on and
nothing else, for any chat template; long conversations lose their oldest exchanges first; every
skipped, truncated or dropped row is counted. TRL then trains on the token ids. The stage writes a
Hugging Face checkpoint with its tokenizer and chat template, and reports the loss on each dataset's
held-out rows separately.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align import hookimpl
from align.data import DataSource, data_setting, on_bad_row_setting
from align.prepare import data_files, prepare
from align.render import padding_waste, read_chat_template
from align.schema import setting
from align.stage import Input, Stage, StageContext


@dataclass
class SFTSettings:
    data: str | list[str | DataSource] = data_setting()
    on_bad_row: Literal["error", "skip"] = on_bad_row_setting()
    chat_template: str | None = setting(
        None,
        help="A Jinja chat template (a .jinja file or the template itself) for a tokenizer that has none "
        "or one to replace; it is saved with the checkpoint, so later stages use it too.",
    )
    max_length: int = setting(
        1024,
        help="Tokens per conversation. Longer ones lose their oldest exchanges; "
        "one whose last exchange alone is longer is dropped (both are counted).",
    )
    packing: bool = setting(
        False,
        help="Pack several conversations into each sequence of max_length tokens "
        "(best-fit, without attention across conversations): less padding, faster epochs.",
    )
    max_steps: int = setting(-1, help="Stop after this many optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = setting(1.0, help="Passes over the data when max_steps is -1.")
    learning_rate: float = setting(2e-5, help="Peak learning rate (TRL's SFT default). Raise it for tiny models.")
    batch_size: int = setting(8, help="Sequences per device per optimizer step.")
    gradient_accumulation_steps: int = setting(1, help="Batches summed before each optimizer step.")
    warmup_steps: float = setting(
        0.0, help="Steps spent warming the learning rate up from 0; a value below 1 is a fraction of all steps."
    )
    eval_steps: int = setting(0, help="Evaluate on the held-out rows every this many steps (0: at the end only).")
    logging_steps: int = setting(5, help="Log the loss every this many steps.")
    seed: int = setting(42, help="Seed of data order, held-out split and initialisation.")


class SFTStage(Stage):
    """Supervised fine-tuning on conversations (TRL SFTTrainer), loss on assistant turns only."""

    name = "sft"
    Config = SFTSettings
    inputs = {"policy": Input("the model to fine-tune", default=("base",))}
    version = "2"

    def data_files(self, config: SFTSettings, recipe: Any) -> list[Path]:
        return data_files(config.data, recipe.dataset_dir)

    def run(self, context: StageContext) -> Mapping[str, float]:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import SFTConfig, SFTTrainer

        from align.render import Renderer

        config: SFTSettings = context.config
        policy = context.inputs["policy"].path
        tokenizer = AutoTokenizer.from_pretrained(policy)
        renderer = Renderer(tokenizer, config.max_length, read_chat_template(config.chat_template))
        prepared = prepare(
            config.data,
            renderer,
            context.plugins,
            kind="sft",
            dataset_dir=context.recipe.dataset_dir,
            on_bad_row=config.on_bad_row,
            seed=config.seed,
        )
        report = prepared.summary()
        lengths = [len(ids) for ids in prepared.train["input_ids"]]
        report["padding_waste"] = padding_waste(lengths, config.batch_size)
        (context.run_dir / "logs" / f"{context.name}.data.json").write_text(json.dumps(report, indent=2))
        held_out = {name: Dataset.from_dict(rows) for name, rows in prepared.held_out.items()}

        checkpoints = context.output_dir / "checkpoints"
        precision = context.recipe.backend.precision
        args = SFTConfig(
            output_dir=str(checkpoints),
            max_steps=config.max_steps,
            num_train_epochs=config.epochs,
            learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_length=config.max_length,
            packing=config.packing,
            warmup_steps=config.warmup_steps,
            logging_steps=config.logging_steps,
            eval_strategy="steps" if held_out and config.eval_steps else "no",
            eval_steps=config.eval_steps or None,
            seed=config.seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        model = AutoModelForCausalLM.from_pretrained(policy)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(prepared.train),
            eval_dataset=held_out or None,
            processing_class=tokenizer,
        )
        losses: list[float] = []

        class _Metrics(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
                if "loss" in numbers:
                    losses.append(numbers["loss"])
                context.log_metrics(numbers, step=state.global_step)

        trainer.add_callback(_Metrics())
        context.plugins.hook.align_trainer_built(context=context, trainer=trainer)
        result = trainer.train()
        metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step)}
        if losses:
            metrics.update(first_loss=losses[0], last_loss=losses[-1])
        if held_out:
            evaluated = trainer.evaluate()
            metrics.update({k: float(v) for k, v in evaluated.items() if k.endswith("_loss")})
        metrics["padding_waste"] = report["padding_waste"]
        trainer.save_model(str(context.output_dir))
        tokenizer.save_pretrained(str(context.output_dir))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the artifact is the model, not the optimizer state
        return metrics


@hookimpl
def align_register_stages() -> list[Stage]:
    return [SFTStage()]
