"""What every TRL-based stage shares: its trainer's settings, model loading, the training run, saving.

A stage reads top to bottom: prepare data, :func:`load_for_training`, :func:`trainer_config`, build its
TRL trainer, :func:`train`, :func:`save`. This module supplies those steps, so the backend, PEFT,
checkpoint resumption, the NaN guard, metrics and TensorBoard behave the same in every stage.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.backend import is_main_process, join_process_group, trainer_arguments
from align.data import DataSource, data_setting, on_bad_row_setting
from align.errors import AlignError
from align.models import Kind, load_model
from align.peft_method import peft_setting
from align.prepare import Prepared, prepare
from align.render import Renderer, read_chat_template
from align.schema import setting
from align.stage import StageContext

logger = logging.getLogger("align")

CHECKPOINTS = "checkpoints"


def load_tokenizer(context: StageContext, role: str = "policy") -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(context.inputs[role].path)


def load_for_training(context: StageContext, role: str, kind: Kind) -> Any:
    """The input ``role``'s model, adapters merged, made trainable by the stage's PEFT method.

    Call it after :func:`trainer_config`: creating the trainer's config is what lets DeepSpeed ZeRO-3
    partition the weights while they load.
    """
    peft = context.peft
    if peft is None:
        raise AlignError(f"stage '{context.name}' has no `peft` setting, which training stages declare")
    model = load_model(context.inputs[role].path, kind, **peft.method.load_kwargs(peft.config))
    return peft.method.apply(model, peft.config, kind)


def trainer_config(config_class: type, context: StageContext, **settings: Any) -> Any:
    """A TRL config from align's ``settings``, the backend's, and the recipe's pass-through options."""
    clashes = sorted(set(context.passthrough) & set(settings))
    if clashes:
        raise AlignError(
            f"stages.{context.name}: {', '.join(clashes)} is set by align from its own settings",
            hint=f"use align's names (`align explain {context.stage.name}`), not TRL's, for these",
        )
    arguments = {
        "output_dir": str(context.output_dir / CHECKPOINTS),
        "report_to": [],
        "logging_nan_inf_filter": False,  # the NaN guard must see a NaN loss, not an average hiding it
        "save_total_limit": 2,
        **trainer_arguments(context.recipe.backend),
        **settings,
        **context.passthrough,
    }
    try:
        config = config_class(**arguments)
    except (TypeError, ValueError) as error:
        raise AlignError(f"stages.{context.name}: TRL refused the settings: {error}") from None
    join_process_group(context.recipe.backend)
    return config


def train(trainer: Any, context: StageContext) -> Any:
    """Run the trainer: metrics to JSONL and TensorBoard, resume from the last checkpoint, stop on NaN."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    metrics, guard = _callbacks(context)
    trainer.add_callback(metrics)
    trainer.add_callback(guard)
    if is_main_process():
        tensorboard = context.run_dir / "tensorboard" / context.name
        trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tensorboard))))
    context.plugins.hook.align_trainer_built(context=context, trainer=trainer)
    resume = last_checkpoint(context.output_dir / CHECKPOINTS)
    if resume is not None:
        logger.info("  resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    guard.raise_if_tripped()
    return result


def save(trainer: Any, tokenizer: Any, context: StageContext) -> None:
    """Write the trained model (or adapter) and tokenizer as the stage's output; drop the checkpoints."""
    trainer.save_model(str(context.output_dir))  # every process: ZeRO-3 gathers the shards for it
    if is_main_process():
        tokenizer.save_pretrained(str(context.output_dir))
        shutil.rmtree(context.output_dir / CHECKPOINTS, ignore_errors=True)
        (context.output_dir / "training_args.bin").unlink(missing_ok=True)


def write_data_report(context: StageContext, report: dict[str, Any]) -> None:
    if is_main_process():
        path = context.run_dir / "logs" / f"{context.name}.data.json"
        path.write_text(json.dumps(report, indent=2), encoding="utf-8")


def last_checkpoint(folder: Path) -> Path | None:
    steps = [
        (int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    return max(steps)[1] if steps else None


def loss_metrics(trainer: Any, result: Any) -> dict[str, float]:
    """Mean training loss, steps, and the first and last logged loss (to see whether it fell)."""
    metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step)}
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    return metrics


def final_metrics(trainer: Any, names: dict[str, str]) -> dict[str, float]:
    """The last logged value of each metric in ``names`` (logged name → reported name)."""
    found: dict[str, float] = {}
    for record in trainer.state.log_history:
        for logged, reported in names.items():
            if logged in record:
                found[reported] = record[logged]
    return found


def _callbacks(context: StageContext) -> tuple[Any, Any]:
    """The metrics callback and the NaN guard. Defined here so that importing this module stays light."""
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        """Every log line to ``logs/<stage>.metrics.jsonl`` and ``align_metrics_logged``."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if is_main_process():
                numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
                context.log_metrics(numbers, step=state.global_step)

    class NanGuard(TrainerCallback):
        """Stops training when the loss stops being a number, and keeps only checkpoints from before."""

        last_good_step = 0
        bad: tuple[int, float] | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if math.isfinite(loss):
                self.last_good_step = state.global_step
                return
            self.bad = (state.global_step, loss)
            control.should_training_stop = True
            control.should_save = False  # never let a checkpoint of broken weights become "the last one"

        def raise_if_tripped(self) -> None:
            if self.bad is None:
                return
            step, loss = self.bad
            folder = context.output_dir / CHECKPOINTS
            for checkpoint in folder.glob("checkpoint-*"):
                if int(checkpoint.name.split("-")[1]) > self.last_good_step:
                    shutil.rmtree(checkpoint, ignore_errors=True)
            kept = last_checkpoint(folder)
            where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was saved before it"
            raise AlignError(
                f"the loss became {loss} at step {step}; training stopped and {where}",
                hint="lower the learning rate, or look for broken rows in the data; rerunning resumes from the "
                "last good checkpoint",
            )

    return Metrics(), NanGuard()


@dataclass
class TrainingSettings:
    """Settings every TRL-based stage shares; a stage's own settings class extends it."""

    data: str | list[str | DataSource] = data_setting()
    on_bad_row: Literal["error", "skip"] = on_bad_row_setting()
    chat_template: str | None = setting(
        None,
        help="A Jinja chat template (a .jinja file or the template itself) for a tokenizer that has none "
        "or one to replace; it is saved with the checkpoint, so later stages use it too.",
    )
    max_length: int = setting(
        1024,
        help="Tokens per example. Longer conversations lose their oldest exchanges; "
        "one whose last exchange alone is longer is dropped (both are counted).",
    )
    peft: dict[str, Any] = peft_setting()
    max_steps: int = setting(-1, help="Stop after this many optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = setting(1.0, help="Passes over the data when max_steps is -1.")
    learning_rate: float = setting(2e-5, help="Peak learning rate. Tiny models want far higher rates than real ones.")
    batch_size: int = setting(8, help="Examples per process per optimizer step.")
    gradient_accumulation_steps: int = setting(1, help="Batches summed before each optimizer step.")
    warmup_steps: float = setting(
        0.0, help="Steps spent warming the learning rate up from 0; a value below 1 is a fraction of all steps."
    )
    eval_steps: int = setting(0, help="Evaluate on the held-out rows every this many steps (0: at the end only).")
    logging_steps: int = setting(5, help="Log metrics every this many steps (the NaN guard checks them too).")
    save_steps: int = setting(
        200,
        help="Checkpoint every this many steps, so that a killed run resumes from the "
        "last one when it is run again (0: no checkpoints).",
    )
    seed: int = setting(42, help="Seed of data order, held-out split and initialisation.")


def common_arguments(config: TrainingSettings, has_held_out: bool) -> dict[str, Any]:
    """The TRL/transformers arguments that :class:`TrainingSettings` maps onto."""
    return {
        "max_steps": config.max_steps,
        "num_train_epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "warmup_steps": config.warmup_steps,
        "logging_steps": config.logging_steps,
        "eval_strategy": "steps" if has_held_out and config.eval_steps else "no",
        "eval_steps": config.eval_steps or None,
        "save_strategy": "steps" if config.save_steps else "no",
        "save_steps": config.save_steps or 500,
        "seed": config.seed,
        "max_length": config.max_length,
    }


def prepare_data(
    context: StageContext, tokenizer: Any, kind: Literal["sft", "preference"], default_eval_size: float = 0.0
) -> Prepared:
    """Load, render and count the stage's data (see :mod:`align.prepare`), and write its report."""
    config: TrainingSettings = context.config
    renderer = Renderer(tokenizer, config.max_length, read_chat_template(config.chat_template))
    prepared = prepare(
        config.data,
        renderer,
        context.plugins,
        kind=kind,
        dataset_dir=context.recipe.dataset_dir,
        on_bad_row=config.on_bad_row,
        seed=config.seed,
        default_eval_size=default_eval_size,
    )
    write_data_report(context, prepared.summary())
    return prepared
