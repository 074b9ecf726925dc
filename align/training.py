"""The toolkit for stages that wrap a TRL trainer: :class:`TRLStage`, and the steps it is made of.

A stage on a TRL trainer is its trainer and config classes, the data kind it takes, its own settings and
the metrics it reports; :class:`TRLStage` does the rest the same way for every such stage: tokenizer, data
preparation and its report, PEFT, backend arguments, callbacks, the NaN guard, resuming from the last
checkpoint, held-out evaluation, ``score:`` and saving. ``sft``, ``rm``, ``dpo``, ``kto``, ``orpo`` and
``simpo`` are each a short subclass. A stage that needs another order can call the steps itself:
:func:`load_tokenizer`, :func:`prepare_data`, :func:`trainer_config`, :func:`load_for_training`,
:func:`train`, :func:`save`.

TRL's classes are found by name through :func:`trl_class`, the one place that knows which of them live
in ``trl.experimental``: when TRL moves one, this is what changes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align import memory
from align.backend import is_main_process, join_process_group, save_on_this_machine, trainer_arguments
from align.backend_files import HF_FILLS, check_stage_values
from align.chat_template import resolve_chat_template
from align.data import DataSource, data_setting, on_bad_row_setting
from align.errors import AlignError
from align.kinds import CONVERSATIONS, PREFERENCES
from align.memory import PRECISION_BYTES, Need
from align.model_options import ModelOptions, check_attention, check_liger, loading_kwargs
from align.models import Kind, load_model
from align.peft_method import LearningRates, learning_rate_setting, peft_setting, resolve_learning_rate
from align.prepare import Prepared, check_data, data_files, prepare
from align.render import Renderer
from align.schema import MAX_SEED, setting
from align.stage import BASE, POLICY, Input, Stage, StageContext
from align.task_score import ScoreSettings, check_score, score_setting
from align.trackers import Tracker, report_to_setting, run_name

if TYPE_CHECKING:
    from align.memory import ModelShape
    from align.plugin_manager import AlignPluginManager
    from align.progress import Progress
    from align.recipe import Recipe, StageSpec

__all__ = [
    "CHECKPOINTS",
    "PolicyTrainingSettings",
    "PretokenizedPairs",
    "TRLStage",
    "TrainingSettings",
    "common_arguments",
    "held_out_setting",
    "checkpoint_problem",
    "last_checkpoint",
    "load_for_training",
    "load_tokenizer",
    "prepare_data",
    "save",
    "train",
    "trainer_config",
    "trl_class",
]

logger = logging.getLogger("align")

CHECKPOINTS = "checkpoints"

#: Where TRL keeps the classes that are not in its top-level namespace (checked with trl 1.16).
TRL_EXPERIMENTAL = {
    "CPOConfig": "trl.experimental.cpo",
    "CPOTrainer": "trl.experimental.cpo",
    "ORPOConfig": "trl.experimental.orpo",
    "ORPOTrainer": "trl.experimental.orpo",
}


def trl_class(name: str) -> type:
    """One of TRL's trainer or config classes by name, wherever this TRL keeps it.

    :param name: a class name (``"KTOTrainer"``), looked up in ``trl`` and, for the classes TRL keeps in
        ``trl.experimental``, where :data:`TRL_EXPERIMENTAL` says; or ``"module:Class"`` for any other
        (``"trl.experimental.tpo:TPOTrainer"``).
    """
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # align, not the user, chose the experimental class
    import trl

    module, _, attribute = name.rpartition(":") if ":" in name else (TRL_EXPERIMENTAL.get(name, "trl"), "", name)
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        raise AlignError(
            f"the installed TRL ({trl.__version__}) has no {module}.{attribute}",
            hint="align is tested with the TRL of constraints.txt; install that version, or name the class "
            "where this TRL keeps it (`module:Class`)",
        ) from None
    return found  # type: ignore[no-any-return]


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
    config = context.config
    options = loading_kwargs(config.attn_implementation) if isinstance(config, ModelOptions) else {}
    model = load_model(context.inputs[role].path, kind, **options, **peft.method.load_kwargs(peft.config))
    return peft.method.apply(model, peft.config, kind)


def trainer_config(config_class: type, context: StageContext, **settings: Any) -> Any:
    """A TRL config from align's ``settings``, the backend's, and the recipe's pass-through options."""
    config = _build_trainer_config(
        config_class,
        f"stages.{context.name}",
        context.stage.name,
        context.output_dir / CHECKPOINTS,
        {**trainer_arguments(context.recipe.backend), "run_name": run_name(context), **settings},
        context.passthrough,
    )
    join_process_group(context.recipe.backend)
    return config


def _build_trainer_config(
    config_class: type,
    key: str,
    plugin: str,
    output_dir: Path,
    settings: Mapping[str, Any],
    passthrough: Mapping[str, Any],
) -> Any:
    clashes = sorted(set(passthrough) & set(settings))
    if clashes:
        raise AlignError(
            f"{key}: {', '.join(clashes)} is set by align from its own settings",
            hint=f"use align's names (`align explain {plugin}`), not TRL's, for these",
        )
    arguments = {
        "output_dir": str(output_dir),
        "report_to": [],  # align reports the trainer's logs itself, as every stage's (align.trackers)
        "logging_nan_inf_filter": False,  # the NaN guard must see a NaN loss, not an average hiding it
        "save_total_limit": 2,
        **settings,
        **passthrough,
    }
    try:
        return config_class(**arguments)
    except (TypeError, ValueError) as error:
        raise AlignError(f"{key}: TRL refused the settings: {error}") from None


def train(trainer: Any, context: StageContext) -> Any:
    """Run the trainer: metrics to JSONL and the stage's trackers, resume from the last checkpoint, stop on NaN."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    metrics, guard = _callbacks(context)
    trainer.add_callback(metrics)
    trainer.add_callback(guard)
    for printer in (PrinterCallback, ProgressCallback):  # bars and metric dicts: align.progress and readable lines
        trainer.remove_callback(printer)
    context.plugins.hook.align_trainer_built(context=context, trainer=trainer)
    folder = context.output_dir / CHECKPOINTS
    resume = last_checkpoint(folder, resumable=True)
    if is_main_process():  # incomplete checkpoints after it: the trainer would rotate the good one out
        kept = int(resume.name.split("-")[1]) if resume else 0
        for newer in folder.glob("checkpoint-*"):
            if newer.name.split("-")[1].isdigit() and int(newer.name.split("-")[1]) > kept:
                shutil.rmtree(newer, ignore_errors=True)
    if resume is not None:
        logger.info("  resuming from %s", resume)
    losses = _LossLedger(trainer, resume)
    trainer.add_callback(losses)
    save_on_this_machine(trainer.model)  # a machine with its own run folder keeps whole checkpoints too
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    guard.raise_if_tripped()
    # The trainer's own train_loss is the mean over the steps of this call only: after a resume, of the
    # steps since the checkpoint. Reported is the mean over every step, as an uninterrupted run's.
    return result._replace(training_loss=losses.whole_run_mean())


#: In every trainer checkpoint align writes, last: the trainer's loss bookkeeping at that step.
LOSS_LEDGER = "align_loss.json"


def _LossLedger(trainer: Any, resume: Path | None) -> Any:  # noqa: N802 - builds a TrainerCallback lazily
    """A callback that carries the trainer's loss bookkeeping across a resume.

    The trainer keeps the sum of logged losses, the loss summed since the last log, and the step of that
    log, and starts all three afresh when it resumes: a resumed stage would report train_loss over the
    steps since the checkpoint, and a first logged loss over a shorter window. Saved with each checkpoint
    and restored when training begins, they make a resumed stage log and report what an uninterrupted
    one does, to the last bit.
    """
    from transformers import TrainerCallback

    class LossLedger(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if resume is None:
                return
            ledger = json.loads((resume / LOSS_LEDGER).read_text(encoding="utf-8"))
            trainer._total_loss_scalar = ledger["logged"]
            pending = ledger["pending"]  # one per process: each sums its own losses until they are logged
            process = trainer.accelerator.process_index
            # Resumed on another number of processes: the logged mean over processes is kept.
            mine = pending[process] if len(pending) == args.world_size else sum(pending) / args.world_size
            trainer._tr_loss += mine
            trainer._globalstep_last_logged = ledger["last_logged_step"]
            for mode, values in ledger.get("buffered", {}).items():  # TRL's metrics awaiting the next log
                trainer._metrics[mode].clear()
                trainer._metrics[mode].update({name: list(v) for name, v in values.items()})
            if "train_tokens" in ledger:
                trainer._total_train_tokens = ledger["train_tokens"]

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            pending = trainer.accelerator.gather(trainer._tr_loss.detach().reshape(1)).tolist()  # every process
            if args.should_save:  # rank 0, or each machine's first process when it keeps its own run folder
                ledger = {
                    "step": state.global_step,
                    "logged": trainer._total_loss_scalar,
                    "pending": pending,
                    "last_logged_step": trainer._globalstep_last_logged,
                }
                if isinstance(getattr(trainer, "_metrics", None), dict):
                    ledger["buffered"] = {m: {k: list(v) for k, v in d.items()} for m, d in trainer._metrics.items()}
                if hasattr(trainer, "_total_train_tokens"):
                    ledger["train_tokens"] = trainer._total_train_tokens
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / LOSS_LEDGER).write_text(json.dumps(ledger), encoding="utf-8")

        def whole_run_mean(self) -> float:
            # After train() everything is drained into _total_loss_scalar.
            return float(trainer._total_loss_scalar) / max(trainer.state.global_step, 1)

    return LossLedger()


def save(trainer: Any, tokenizer: Any, context: StageContext) -> None:
    """Write the trained model (or adapter) and tokenizer as the stage's output; drop the checkpoints."""
    stop_generation_at_eos(trainer.model, tokenizer)
    trainer.save_model(str(context.output_dir))  # every process: ZeRO-3 gathers the shards for it
    if is_main_process():
        tokenizer.save_pretrained(str(context.output_dir))
        shutil.rmtree(context.output_dir / CHECKPOINTS, ignore_errors=True)
        (context.output_dir / "training_args.bin").unlink(missing_ok=True)


def stop_generation_at_eos(model: Any, tokenizer: Any) -> None:
    """Make the model's generation config stop at the tokenizer's end-of-sequence token too.

    A named chat template can make another token the end of a reply (``<|eot_id|>`` on a Llama 3 base
    model: :meth:`align.chat_template.ChatTemplate.install`); align's engines stop at the tokenizer's token,
    and this makes transformers' ``generate`` on the saved checkpoint stop there as well.
    """
    config = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id
    if config is None or eos is None:
        return
    current = config.eos_token_id
    ids = [] if current is None else [current] if isinstance(current, int) else list(current)
    if eos not in ids:
        config.eos_token_id = [*ids, eos] if ids else eos


def _write_data_report(context: StageContext, report: dict[str, Any]) -> None:
    if is_main_process():
        path = context.run_dir / "logs" / f"{context.name}.data.json"
        path.write_text(json.dumps(report, indent=2), encoding="utf-8")


def last_checkpoint(folder: Path, resumable: bool = False) -> Path | None:
    """The newest complete trainer checkpoint in ``folder`` (``checkpoint-N``), or None.

    A kill (or SIGTERM, or a full disk) while the trainer writes a checkpoint leaves it incomplete, and
    resuming from it fails on every rerun. Such a checkpoint is logged with what is wrong and skipped for
    the one before (:func:`checkpoint_problem` says what complete means).

    :param resumable: also skip the final step's checkpoint (a kill after it, before the stage published):
        transformers, resumed there in the middle of an epoch, trains one step too many. The steps after
        the checkpoint before it are redone instead.
    """
    steps = [
        (int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    for step, path in sorted(steps, reverse=True):
        problem = checkpoint_problem(path, step)
        if problem is None and resumable:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            if state["global_step"] >= state["max_steps"]:
                problem = "it is the final step's, from which the trainer would train a step too many"
        if problem is None:
            return path
        logger.info("  skipping %s: %s", path, problem)
    return None


def checkpoint_problem(path: Path, step: int) -> str | None:
    """Why the trainer checkpoint ``path`` of ``step`` cannot be resumed from, or None if it can.

    Complete means: ``trainer_state.json`` and align's ``align_loss.json`` (written after the
    trainer's files) readable and for this step; the weights (safetensors files
    whose size matches their header, or ``.bin`` files that are whole zip archives); the optimizer and
    scheduler (or DeepSpeed's ``global_step*`` folder instead). Reading headers and zip directories costs
    a few reads per file, whatever the checkpoint's size.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its trainer_state.json cannot be read ({type(error).__name__})"
    if state.get("global_step") != step:
        return f"its trainer_state.json is for step {state.get('global_step')}, not {step}"
    try:
        if json.loads((path / LOSS_LEDGER).read_text(encoding="utf-8"))["step"] != step:
            return f"its {LOSS_LEDGER} is for another step"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"its {LOSS_LEDGER} cannot be read ({type(error).__name__}), written last"
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin"]
    deepspeed = any(p.is_dir() and p.name.startswith("global_step") for p in path.iterdir())
    if not weights and not deepspeed:
        return "it holds no weights"
    for file in weights:
        problem = _safetensors_problem(file) if file.suffix == ".safetensors" else _zip_problem(file)
        if problem:
            return f"{file.name} {problem}"
    if not deepspeed:
        for name in ("optimizer.pt", "scheduler.pt"):
            problem = _zip_problem(path / name) if (path / name).is_file() else "is missing"
            if problem:
                return f"{name} {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"has no readable header ({type(error).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    size = file.stat().st_size
    return None if size == 8 + length + end else f"has {size} bytes, not the {8 + length + end} its header lists"


def _zip_problem(file: Path) -> str | None:
    import zipfile

    return None if zipfile.is_zipfile(file) else "is not a whole file (its archive is cut short)"


def _loss_metrics(trainer: Any, result: Any) -> dict[str, float]:
    """Mean training loss, steps, and the first and last logged loss (to see whether it fell)."""
    metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step)}
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    return metrics


def _last_logged(trainer: Any, names: Mapping[str, str]) -> dict[str, float]:
    """``train_<name>``: the last logged value of each metric in ``names`` (logged name → align's name)."""
    found: dict[str, float] = {}
    for record in trainer.state.log_history:
        for logged, reported in names.items():
            if logged in record:
                found[f"train_{reported}"] = float(record[logged])
    return found


def _held_out(trainer: Any, names: Mapping[str, str]) -> dict[str, float]:
    """``eval_<dataset>_<name>`` for each held-out dataset, and ``eval_<name>``, their mean.

    Each dataset is evaluated on its own: TRL logs its own metrics (DPO's reward accuracy, say) without
    the dataset's name, so one ``evaluate()`` over all of them would keep only the last dataset's.
    """
    found: dict[str, float] = {}
    names = {"loss": "loss", **names}
    datasets = trainer.eval_dataset  # as the trainer prepared them
    for dataset in datasets:
        evaluated = trainer.evaluate(eval_dataset=datasets[dataset], metric_key_prefix=f"eval_{dataset}")
        for logged, reported in names.items():
            value = evaluated.get(f"eval_{dataset}_{logged}", evaluated.get(f"eval_{logged}"))
            if value is not None:
                found[f"eval_{dataset}_{reported}"] = float(value)
    for reported in names.values():
        values = [found[key] for d in datasets if (key := f"eval_{d}_{reported}") in found]
        if values:
            found[f"eval_{reported}"] = sum(values) / len(values)
    return found


def _callbacks(context: StageContext) -> tuple[Any, Any]:
    """The metrics callback and the NaN guard. Defined here so that importing this module stays light."""
    from transformers import TrainerCallback

    stage = context.stage
    renamed = {"loss": "loss", **getattr(stage, "metrics", {})}  # TRL's names → align's, as reported
    shown = [name for name in stage.key_metrics if name in renamed.values()]

    class Metrics(TrainerCallback):
        """Every log line to ``logs/<stage>.metrics.jsonl`` and ``align_metrics_logged``; the progress bar."""

        bar: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = context.progress(state.max_steps, done=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if is_main_process():
                numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
                context.log_metrics(numbers, step=state.global_step)
                if self.bar is not None:
                    named = {renamed[k]: v for k, v in numbers.items() if k in renamed}
                    self.bar.update(numbers={name: named[name] for name in shown if name in named})

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()

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


#: Tiny random models want far higher rates than either.
SFT_RATES = LearningRates(2e-5, "TRL's SFTConfig", 1e-4, "LLaMA-Factory's examples/train_lora/qwen3_lora_sft.yaml")


@dataclass
class TrainingSettings(ModelOptions):
    """Settings every TRL-based stage shares; a stage's own settings class extends it."""

    data: str | list[str | DataSource] = data_setting()
    on_bad_row: Literal["error", "skip"] = on_bad_row_setting()
    chat_template: str | None = setting(
        None,
        help="A chat template for a tokenizer that has none or one to replace: the name of a registered one "
        "(`align plugins` lists them), a .jinja file or the template itself. It is saved with "
        "the checkpoint, so later stages use it too.",
    )
    max_length: int = setting(
        1024,
        help="Tokens per example. Longer conversations lose their oldest exchanges; "
        "one whose last exchange alone is longer is dropped (both are counted).",
        minimum=1,
    )
    peft: dict[str, Any] = peft_setting()
    # -1 is transformers' own "no step limit": 0 or -5 would train nothing and be reported done.
    max_steps: int = setting(
        -1,
        help="Stop after this many optimizer steps; -1 trains for `epochs` instead.",
        minimum=1,
        special={-1: "train for `epochs` instead"},
    )
    epochs: float = setting(1.0, help="Passes over the data when max_steps is -1.", above=0)
    learning_rate: float | None = learning_rate_setting(SFT_RATES)
    batch_size: int = setting(8, help="Examples per process per optimizer step.", minimum=1)
    gradient_accumulation_steps: int = setting(1, help="Batches summed before each optimizer step.", minimum=1)
    warmup_steps: float = setting(
        0.0,
        help="Steps spent warming the learning rate up from 0; a value below 1 is a fraction of all steps.",
        minimum=0,
    )
    eval_steps: int = setting(
        0, help="Evaluate on the held-out rows every this many steps (0: at the end only).", minimum=0
    )
    # transformers refuses logging every 0 steps, and the NaN guard reads the logged losses.
    logging_steps: int = setting(
        5, help="Log metrics every this many steps (the NaN guard checks them too).", minimum=1
    )
    report_to: Tracker | list[Tracker] | None = report_to_setting()
    save_steps: int = setting(
        200,
        help="Checkpoint every this many steps, so that a killed run resumes from the "
        "last one when it is run again (0: no checkpoints).",
        minimum=0,
    )
    seed: int = setting(42, help="Seed of data order, held-out split and initialisation.", minimum=0, maximum=MAX_SEED)
    liger_kernel: bool = setting(
        False,
        help="Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, the loss without whole logits): less memory "
        "and faster steps on a GPU. Needs the liger-kernel package (`pip install -e '.[liger]'`).",
    )


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
        "gradient_checkpointing": config.gradient_checkpointing,
        "use_liger_kernel": config.liger_kernel,
        # Non-reentrant: works with frozen embeddings (adapters) and with DDP, unlike the old default.
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if config.gradient_checkpointing else None,
    }


def prepare_data(context: StageContext, tokenizer: Any, kind: str, default_eval_size: float = 0.0) -> Prepared:
    """Load, render and count the stage's data as rows of the data kind ``kind`` (see :mod:`align.prepare`),
    and write its report to ``logs/<stage>.data.json``."""
    config: TrainingSettings = context.config
    template = resolve_chat_template(config.chat_template, context.plugins, f"stages.{context.name}.chat_template")
    renderer = Renderer(tokenizer, config.max_length, template)
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
    _write_data_report(context, prepared.summary())
    return prepared


def held_out_setting(default: float = 0.0) -> Any:
    """The ``eval_size`` setting of a stage that evaluates on held-out rows (datasets may set their own)."""
    return setting(
        default,
        help="Rows held out from each dataset that sets no eval_size of its own, for held-out metrics: a "
        "fraction below 1 or a count (of pairs, for preference data: a pair stays whole).",
        minimum=0,
    )


@dataclass
class PolicyTrainingSettings(TrainingSettings):
    """:class:`TrainingSettings` plus ``score:``, for stages whose output is a policy."""

    score: ScoreSettings | None = score_setting()


class TRLStage(Stage):
    """Base class for stages that wrap a TRL trainer. A subclass declares, and may override:

    * ``trainer``, ``trainer_config``: the names of TRL's classes (``"KTOTrainer"``, ``"KTOConfig"``), found
      by :func:`trl_class`. The config's fields are also the stage's pass-through settings.
    * ``data_kind``: the data kind it trains on (``conversations``, ``preferences``, ``feedback``, …).
    * ``Config``: its settings, a dataclass extending :class:`TrainingSettings` (or
      :class:`PolicyTrainingSettings` for a policy, which adds ``score:``).
    * ``metrics``: TRL's logged name → align's name, reported as ``train_<name>`` (last logged),
      ``eval_<dataset>_<name>`` and ``eval_<name>`` (held out, per dataset and their mean).
    * ``model_kind``: ``causal`` (a policy) or ``reward`` (a one-output sequence classifier).
    * ``learning_rates``: the default ``learning_rate`` for full training and for adapters, with sources;
      a settings class that redeclares ``learning_rate`` uses :func:`~align.peft_method.learning_rate_setting`
      with the same rates.
    * ``reference``: hand the trainer a frozen reference (``ref_model``): the input policy, or, for a PEFT
      adapter, ``None`` so that TRL switches the adapter off instead of holding a second copy.
    * :meth:`trainer_settings`: the TRL config arguments its own settings map to.
    * :meth:`dataset`: the trainer's columns from the data kind's rendered ones (as they are by default).
    * :meth:`trainer_class`: the trainer class, subclassed where TRL would tokenize again.
    * :meth:`extra_metrics`: anything else it reports.

    Held-out evaluation uses each dataset's ``eval_size`` and, for datasets that set none, the stage's
    own ``eval_size`` setting when its ``Config`` has one.
    """

    trainer: ClassVar[str]
    trainer_config: ClassVar[str]
    data_kind: ClassVar[str] = CONVERSATIONS
    Config: ClassVar[type] = PolicyTrainingSettings
    metrics: ClassVar[Mapping[str, str]] = {}
    key_metrics: ClassVar[tuple[str, ...]] = ("loss", "task_score")
    model_kind: ClassVar[Kind] = "causal"
    reference: ClassVar[bool] = False
    produces: ClassVar[str | None] = POLICY
    inputs: ClassVar[Mapping[str, Input]] = {"policy": Input("the model to train", artifact=POLICY, default=(BASE,))}
    learning_rates: ClassVar[LearningRates] = SFT_RATES
    #: Whether TRL computes the loss through its fused output layer, in tiles, never holding whole logits.
    fused_head: ClassVar[bool] = True

    # ---------------------------------------------------------------------------- what a subclass adds
    def trainer_settings(self, config: Any) -> dict[str, Any]:
        """TRL config arguments from the stage's own settings (beyond :class:`TrainingSettings`)."""
        return {}

    def dataset(self, rows: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """The trainer's dataset columns from the data kind's rendered columns."""
        return dict(rows)

    def trainer_class(self) -> type:
        """The trainer to build; subclass TRL's here to skip its own tokenization of align's token ids."""
        return trl_class(self.trainer)

    def extra_metrics(self, trainer: Any, data: Prepared, config: Any) -> dict[str, float]:
        """Metrics beyond the loss, :attr:`metrics` and ``task_score``."""
        return {}

    # ---------------------------------------------------------------------------- the stage contract
    def passthrough_class(self) -> type:
        return trl_class(self.trainer_config)

    def data_files(self, config: Any, recipe: Recipe) -> list[Path]:
        files = data_files(config.data, recipe.dataset_dir)
        template = Path(config.chat_template).expanduser() if config.chat_template else None
        if template is not None and "{" not in config.chat_template and template.is_file():
            files.append(template)  # an edited .jinja file reruns the stage, as edited data does
        return files

    def check(self, config: Any, recipe: Recipe, plugins: AlignPluginManager) -> None:
        check_data(
            config.data, plugins, kind=self.data_kind, dataset_dir=recipe.dataset_dir, on_bad_row=config.on_bad_row
        )
        check_score(getattr(config, "score", None), plugins, recipe)
        spec = recipe.spec_of(config)
        check_attention(config.attn_implementation, f"stages.{spec.name}")
        if config.liger_kernel:
            check_liger(f"stages.{spec.name}")
        resolve_chat_template(config.chat_template, plugins, f"stages.{spec.name}.chat_template")
        resolve_learning_rate(config, spec, self.learning_rates)
        check_stage_values(
            recipe.backend, f"stages.{spec.name}", _deepspeed_values(self, config, spec, recipe), HF_FILLS
        )
        if spec.passthrough:  # only then: building a TRL config imports TRL, which takes seconds
            self._check_passthrough(config, spec, recipe)

    def _check_passthrough(self, config: Any, spec: Any, recipe: Recipe) -> None:
        """Build the stage's TRL config as its run will, so that TRL refuses a bad value before any work."""
        import tempfile

        # Not the distributed backends' arguments: TRL sets up devices and process groups when it reads
        # them. They are align's own, checked already; the pass-through values are what is checked here.
        backend = {k: v for k, v in trainer_arguments(recipe.backend).items() if k in ("bf16", "fp16", "use_cpu")}
        settings = {**backend, **common_arguments(config, has_held_out=True), **self.trainer_settings(config)}
        config_class = trl_class(self.trainer_config)
        with tempfile.TemporaryDirectory() as scratch:
            _build_trainer_config(
                config_class, f"stages.{spec.name}", self.name, Path(scratch), settings, spec.passthrough
            )

    def memory(
        self, config: Any, spec: StageSpec, recipe: Recipe, plugins: AlignPluginManager, shape: ModelShape
    ) -> list[Need]:
        backend = recipe.backend
        act = PRECISION_BYTES[backend.precision]
        trained = memory.trainable(spec.peft, shape)
        needs = [memory.weights("policy", shape.parameters, memory.base_bytes(spec.peft), backend, trained=True)]
        if trained < shape.parameters:
            needs.append(Need("adapter weights", trained * 4))
        needs += memory.adam_and_gradients("trained", trained, backend)
        # A pair is two sequences in one forward pass with gradients (KTO's KL counterparts run without).
        tokens = config.batch_size * config.max_length * (2 if self.data_kind == PREFERENCES else 1)
        padded = memory.padding(config.attn_implementation, config.max_length)
        needs.append(memory.activations(shape, tokens, act, config.gradient_checkpointing, padded))
        if self.model_kind == "causal":
            needs.append(memory.fused_lm_head(shape, tokens) if self.fused_head else memory.logits(shape, tokens))
        if self.reference and trained == shape.parameters:  # an adapter's reference: the adapter switched off
            needs.append(memory.weights("reference", shape.parameters, act, backend, trained=False))
        return needs

    def facts(self) -> list[str]:
        return [
            f"trains on: {self.data_kind} data; produces: a {self.produces or 'model'}",
            f"TRL: {self.trainer}; any {self.trainer_config} option is passed through",
        ]

    def run(self, context: StageContext) -> Mapping[str, float]:
        from datasets import Dataset
        from transformers import set_seed

        config = context.config
        tokenizer = load_tokenizer(context)
        data = prepare_data(context, tokenizer, self.data_kind, default_eval_size=getattr(config, "eval_size", 0.0))
        held_out = {name: Dataset.from_dict(self.dataset(rows)) for name, rows in data.held_out.items()}
        arguments = {**common_arguments(config, bool(held_out)), **self.trainer_settings(config)}
        args = trainer_config(trl_class(self.trainer_config), context, **arguments)
        # Before any weight is made: a new head (a reward model's score) or adapter must not depend on
        # what ran earlier in this process (an earlier stage trained, or came from the cache).
        set_seed(args.seed)
        model = load_for_training(context, "policy", self.model_kind)
        extra: dict[str, Any] = {}
        if self.reference:  # an adapter's reference is the model with the adapter off: no second copy
            adapter = hasattr(model, "peft_config")
            extra["ref_model"] = None
            if not adapter:
                frozen = loading_kwargs(config.attn_implementation, context.recipe.backend)
                extra["ref_model"] = load_model(context.inputs["policy"].path, self.model_kind, **frozen)
        trainer = self.trainer_class()(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(self.dataset(data.train)),
            eval_dataset=held_out or None,
            processing_class=tokenizer,
            **extra,
        )
        metrics = _loss_metrics(trainer, train(trainer, context))
        metrics.update(_last_logged(trainer, self.metrics))
        if held_out:
            metrics.update(_held_out(trainer, self.metrics))
        metrics.update(self.extra_metrics(trainer, data, config))
        if getattr(config, "score", None) is not None:
            from align.task_score import task_score

            metrics.update(task_score(trainer.model, tokenizer, config.score, context))
        if "ref" in getattr(trainer.model, "peft_config", {}):  # TRL's copy of the fresh adapter, as reference
            trainer.model.delete_adapter("ref")
        save(trainer, tokenizer, context)
        return metrics


#: transformers' defaults of the trainer options that a DeepSpeed config may set too (TRL's configs keep them).
_TRANSFORMERS_DEFAULTS = {
    "max_grad_norm": 1.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
}


def _deepspeed_values(stage: TRLStage, config: Any, spec: Any, recipe: Recipe) -> dict[str, tuple[Any, str]]:
    """The DeepSpeed keys a TRL stage's arguments fill (as transformers' integration does), each with the
    stage's value and where that comes from, for :func:`~align.backend_files.check_stage_values`."""
    key = f"stages.{spec.name}"
    own = {**stage.trainer_settings(config), **spec.passthrough}

    def option(name: str) -> tuple[Any, str]:
        if name in spec.passthrough:
            return spec.passthrough[name], f"{key}.{name}"
        if name in own:
            return own[name], f"the {stage.name} stage's {name}"
        return _TRANSFORMERS_DEFAULTS[name], f"transformers' default {name}"

    world = recipe.backend.world_size
    batch, accumulation = f"{key}.batch_size", f"{key}.gradient_accumulation_steps"
    learning_rate = (config.learning_rate, f"{key}.learning_rate")
    (beta1, where1), (beta2, where2) = option("adam_beta1"), option("adam_beta2")
    return {
        "train_micro_batch_size_per_gpu": (config.batch_size, batch),
        "gradient_accumulation_steps": (config.gradient_accumulation_steps, accumulation),
        "train_batch_size": (
            config.batch_size * config.gradient_accumulation_steps * world,
            f"{batch} × {accumulation} × {world} process(es)",
        ),
        "gradient_clipping": option("max_grad_norm"),
        "optimizer.params.lr": learning_rate,
        "scheduler.params.warmup_max_lr": learning_rate,
        "optimizer.params.betas": ([beta1, beta2], f"[{where1}, {where2}]"),
        "optimizer.params.eps": option("adam_epsilon"),
        "optimizer.params.weight_decay": option("weight_decay"),
    }


class PretokenizedPairs:
    """A mixin that makes TRL's paired trainers which tokenize rows themselves (``ORPOTrainer``,
    ``CPOTrainer``) train on align's rendered pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) as
    they are. Put it first: ``class Trainer(PretokenizedPairs, trl_class("ORPOTrainer"))``.

    * :meth:`tokenize_row` lays a pair out as TRL's does: ``prompt_input_ids``, and for each side its
      ``*_input_ids`` (prompt + reply), ``*_attention_mask`` and ``*_labels`` (-100 over the prompt).
      align's replies already end with the end-of-sequence token and fit ``max_length``, so nothing is
      added or cut.
    * The held-out datasets arrive as a ``DatasetDict``: these trainers ``map`` over ``eval_dataset``, which
      a plain dict of several datasets cannot do.
    """

    def __init__(self, *args: Any, eval_dataset: Any = None, **kwargs: Any) -> None:
        from datasets import DatasetDict

        if isinstance(eval_dataset, dict) and not isinstance(eval_dataset, DatasetDict):
            eval_dataset = DatasetDict(eval_dataset)
        super().__init__(*args, eval_dataset=eval_dataset, **kwargs)  # type: ignore[call-arg]

    def tokenize_row(self, feature: Mapping[str, Any], model: Any = None) -> dict[str, list[int]]:
        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = prompt + reply
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            row[f"{side}_labels"] = [-100] * len(prompt) + reply
        return row
