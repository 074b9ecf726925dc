"""``sft``: supervised fine-tuning on conversations, with TRL's SFTTrainer.

The loss covers assistant turns only (the chat template marks them with ``{% generation %}``). The
stage writes a Hugging Face checkpoint with its tokenizer and chat template.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import AlignError, hookimpl
from align.schema import setting
from align.stage import Input, Stage, StageContext


@dataclass
class SFTSettings:
    data: str = setting(
        help="A JSON or JSON Lines file of conversations: one object per row with a `messages` list of "
        "{role, content} turns (OpenAI style)."
    )
    max_steps: int = setting(-1, help="Stop after this many optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = setting(1.0, help="Passes over the data when max_steps is -1.")
    learning_rate: float = setting(2e-5, help="Peak learning rate (TRL's SFT default). Raise it for tiny models.")
    batch_size: int = setting(8, help="Conversations per device per optimizer step.")
    gradient_accumulation_steps: int = setting(1, help="Batches summed before each optimizer step.")
    max_length: int = setting(1024, help="Tokens per conversation; longer ones are truncated.")
    warmup_steps: float = setting(
        0.0, help="Steps spent warming the learning rate up from 0; a value below 1 is a fraction of all steps."
    )
    logging_steps: int = setting(5, help="Log the loss every this many steps.")
    seed: int = setting(42, help="Seed of data order and initialisation.")


class SFTStage(Stage):
    name = "sft"
    Config = SFTSettings
    inputs = {"policy": Input("the model to fine-tune", default=("base",))}

    def data_files(self, config: SFTSettings) -> list[Path]:
        return [Path(config.data)]

    def run(self, context: StageContext) -> Mapping[str, float]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import SFTConfig, SFTTrainer

        import datasets

        datasets.disable_progress_bars()  # the trainer's own progress bar is the one worth watching

        config: SFTSettings = context.config
        policy = context.inputs["policy"].path
        tokenizer = AutoTokenizer.from_pretrained(policy)
        if not tokenizer.chat_template:
            raise AlignError(f"stage '{context.name}': the tokenizer of {policy} has no chat template")
        model = AutoModelForCausalLM.from_pretrained(policy)
        dataset = _load_conversations(Path(config.data))

        checkpoints = context.output_dir / "checkpoints"
        precision = context.recipe.backend.precision
        args = SFTConfig(
            output_dir=str(checkpoints),
            max_steps=config.max_steps,
            num_train_epochs=config.epochs,
            learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_length=config.max_length,
            warmup_steps=config.warmup_steps,
            logging_steps=config.logging_steps,
            seed=config.seed,
            assistant_only_loss=True,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        losses: list[float] = []

        class _Metrics(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
                if "loss" in numbers:
                    losses.append(numbers["loss"])
                context.log_metrics(numbers, step=state.global_step)

        trainer.add_callback(_Metrics())
        context.hook.align_trainer_built(context=context, trainer=trainer)
        result = trainer.train()
        trainer.save_model(str(context.output_dir))
        tokenizer.save_pretrained(str(context.output_dir))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the artifact is the model, not the optimizer state
        metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step)}
        if losses:
            metrics.update(first_loss=losses[0], last_loss=losses[-1])
        return metrics


def _load_conversations(path: Path) -> Any:
    """Read a conversations file into a ``datasets.Dataset``, with errors that name file and row."""
    from datasets import Dataset

    rows = _read_rows(path)
    if not rows:
        raise AlignError(f"{path}: the dataset is empty")
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise AlignError(f"{where}: expected an object with a non-empty `messages` list")
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or "role" not in turn:
                raise AlignError(f"{where}: every turn needs a `role` and a string `content`; got {turn!r}")
        if not any(turn["role"] == "assistant" for turn in messages):
            raise AlignError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return Dataset.from_list([{"messages": row["messages"]} for row in rows])


def _read_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AlignError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise AlignError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    where = f"{path} line {number}"
                    raise AlignError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AlignError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(data, list):
        raise AlignError(f"{path}: expected a JSON list of rows")
    return data


@hookimpl
def align_register_stages() -> list[Stage]:
    return [SFTStage()]
