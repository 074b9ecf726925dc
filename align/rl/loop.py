"""The online-RL loop, as a stage base class: PPO, GRPO, RLOO and REINFORCE++ are settings of it.

Each iteration (``steps`` of them):

1. draw ``batch_size`` prompts (:class:`~align.rl.prompts.PromptSampler`) and generate ``num_generations``
   responses to each through a rollout engine (``hf``, ``vllm``, …);
2. without gradients, ``forward_batch_size`` rows at a time: the policy's log-probabilities at the
   sampling temperature (unless the batch makes one update and nothing needs them before it: then the
   update's own serve), the critic's values (when one trains), the reference's log-probabilities (when a
   KL is asked for), and the scores (:class:`~align.rl.scoring.Scorer`: reward model and/or functions),
   less a penalty for a response that never ended;
3. per-token rewards: the score at the last token, minus ``kl_coef`` × the per-token KL to the reference;
4. advantages from the stage's registered estimator (:mod:`align.rl.advantages`), whitened if asked;
5. ``ppo_epochs`` passes in minibatches of ``mini_batch_size`` responses, each accumulated over
   micro-batches of ``micro_batch_size``: the clipped policy loss, the critic's loss, and the k3 KL term
   (``beta``), aggregated per ``loss_aggregation`` (:mod:`align.rl.loss`);
6. push the new weights to the engine, adapt the KL coefficient, step the learning rate.

The learning rate decays linearly to 0 over every update of the run. Checkpoints (``save_steps``,
:mod:`align.rl.checkpoint`) hold everything a resumed run needs to continue as if never stopped, including
what its final metrics are made of. A non-finite loss stops the stage before its checkpoint is written.

A stage is a subclass of :class:`OnlineRLStage` whose ``Config`` subclasses :class:`OnlineRLSettings`
with its own defaults (``advantage_estimator`` first among them).
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from align import memory
from align.backend import is_main_process, save_on_this_machine
from align.backend_files import RL_FILLS, check_stage_values
from align.conversation import Example
from align.data import DataSource, data_setting, on_bad_row_setting
from align.errors import AlignError
from align.kinds import PROMPTS
from align.memory import PRECISION_BYTES, ModelShape, Need
from align.model_options import ModelOptions, check_attention, loading_kwargs, offload_setting, on_device
from align.peft_method import LearningRates, learning_rate_setting, peft_setting, resolve_learning_rate
from align.prepare import check_data, data_files
from align.reward import RewardSpec, resolve_reward_functions, reward_functions_setting
from align.rl.loss import Aggregation
from align.rollout import check_engine, engine_named
from align.schema import MAX_SEED, build, setting
from align.stage import BASE, POLICY, REWARD_MODEL, Input, Stage, StageContext
from align.task_score import ScoreSettings, check_score, score_setting
from align.trackers import Tracker, report_to_setting

__all__ = ["OnlineRLSettings", "OnlineRLStage"]


# 1.41e-5: TRL's gpt2-sentiment example (reference_values: trl_gpt2_sentiment_notebook_source).
PPO_RATES = LearningRates(
    1.41e-5, "TRL's gpt2-sentiment example", 1e-5, "LLaMA-Factory's examples/train_lora/llama3_lora_ppo.yaml"
)


@dataclass
class OnlineRLSettings(ModelOptions):
    """The loop's settings. A stage subclasses this and redeclares the ones whose defaults are its own."""

    data: str | list[str | DataSource] = data_setting()
    advantage_estimator: str = setting(
        help="How rewards become advantages: gae (PPO, trains a critic), grpo, rloo, reinforce_pp, or a "
        "plugin's (`align plugins` lists them)."
    )
    estimator_options: dict[str, Any] = setting(
        default_factory=dict, help="The estimator's own settings, e.g. grpo's {scale_rewards: none} (Dr. GRPO)."
    )
    on_bad_row: Literal["error", "skip"] = on_bad_row_setting()
    peft: dict[str, Any] = peft_setting()
    engine: str | None = setting(
        None, help="The rollout engine that generates responses (default: the fallback engine, transformers)."
    )
    engine_options: dict[str, Any] = setting(
        default_factory=dict, help="The engine's own settings (`align explain ENGINE`), e.g. {batch_size: 32}."
    )
    reward_functions: list[str | RewardSpec] = reward_functions_setting()
    reward_model_weight: float = setting(1.0, help="Weight of the reward model's score in the reward.", minimum=0)
    steps: int = setting(100, help="Iterations: each generates a batch, scores it and updates the policy.", minimum=1)
    batch_size: int = setting(32, help="Prompts per iteration on each process.", minimum=1)
    num_generations: int = setting(1, help="Responses sampled per prompt (a group, for grpo and rloo).", minimum=1)
    mini_batch_size: int | None = setting(
        8, help="Responses per optimizer step (None: the whole iteration's responses).", minimum=1
    )
    micro_batch_size: int | None = setting(
        None,
        help="Responses per forward and backward pass; gradients accumulate over a minibatch (None: the "
        "minibatch at once). Peak training memory follows it.",
        minimum=1,
    )
    forward_batch_size: int | None = setting(
        None,
        help="Rows per forward pass when scoring a batch (log-probs, reference, values, reward model); None: "
        "the whole batch at once.",
        minimum=1,
    )
    ppo_epochs: int = setting(4, help="Passes over each iteration's responses (GRPO's μ).", minimum=1)
    learning_rate: float | None = learning_rate_setting(
        PPO_RATES, "Learning rate of the policy (and critic); Adam, eps 1e-5, linear decay over steps"
    )
    max_prompt_length: int = setting(256, help="Tokens of prompt; longer prompts are dropped and counted.", minimum=1)
    max_new_tokens: int = setting(48, help="Longest response.", minimum=1)
    # Above 0, unlike score's: the log-probabilities are divided by it, so there is no greedy RL.
    temperature: float = setting(
        1.0, help="Sampling temperature, also applied to the log-probabilities (N details 11).", above=0
    )
    # 0.05 and k1: TRL's PPOConfig defaults.
    kl_coef: float = setting(
        0.05, help="Weight of the per-token KL penalty in the reward (its starting value if adaptive).", minimum=0
    )
    kl_estimator: Literal["k1", "k3"] = setting(
        "k1", help="KL estimate of the penalty: k1 = log p - log q (unbiased); k3 (never negative, lower variance)."
    )
    adaptive_kl: bool = setting(False, help="Adapt kl_coef towards kl_target (Ziegler et al. 2019).")
    # 6.0 and 10000: lm-human-preferences' AdaptiveKLController (reference_values: adaptive_kl_controller).
    kl_target: float = setting(6.0, help="KL (nats per response) the adaptive controller aims at.", above=0)
    kl_horizon: float = setting(10000.0, help="How slowly the adaptive controller moves.", above=0)
    beta: float = setting(
        0.0,
        help="Weight of the k3 KL-to-reference term in the loss (GRPO's β); 0 with kl_coef 0 loads no reference.",
        minimum=0,
    )
    # gamma 1, lambda 0.95, clip 0.2 / 0.2, value coefficient 0.1: TRL's PPOConfig defaults.
    gamma: float = setting(1.0, help="Discount of future rewards within a response.", minimum=0, maximum=1)
    lam: float = setting(
        0.95, help="GAE λ: lower trusts the critic more (less variance, more bias).", minimum=0, maximum=1
    )
    clip_range: float = setting(0.2, help="Ratio clipping ε: the ratio is kept above 1 - ε.", above=0, below=1)
    clip_range_high: float | None = setting(
        None,
        help="Upper clipping ε: the ratio is kept below 1 + this (DAPO's clip-higher: 0.28); None: clip_range.",
        above=0,
    )
    value_clip_range: float = setting(0.2, help="Clipping of the critic's update.", above=0)
    value_coef: float = setting(0.1, help="Weight of the critic's loss.", minimum=0)
    loss_aggregation: Aggregation = setting(
        "token",
        help="token: mean over all tokens (DAPO); sequence: mean per response, then over responses (GRPO); "
        "constant: token sum / (responses × max_new_tokens) (Dr. GRPO).",
    )
    whiten_advantages: bool = setting(True, help="Normalise advantages over the batch (N details 9).")
    normalize_rewards: bool = setting(False, help="Normalise scores per batch (mean kept) before the KL penalty.")
    reward_clip: float | None = setting(None, help="Clip scores to [-reward_clip, reward_clip].", above=0)
    missing_eos_penalty: float | None = setting(
        None, help="Subtract this from the score of a response that never ended (N details 13).", minimum=0
    )
    drop_uniform_groups: bool = setting(
        False, help="Leave out of the update the groups whose rewards are all equal: they carry no signal."
    )
    logging_steps: int = setting(1, help="Log metrics every this many iterations.", minimum=1)
    report_to: Tracker | list[Tracker] | None = report_to_setting()
    save_steps: int = setting(20, help="Checkpoint every this many iterations, for resuming (0: never).", minimum=0)
    seed: int = setting(42, help="Seed of prompt order, sampling and initialisation.", minimum=0, maximum=MAX_SEED)
    offload_frozen_models: bool = offload_setting()
    score: ScoreSettings | None = score_setting()


class OnlineRLStage(Stage):
    """Base class of online-RL stages: set ``name`` and ``Config`` (an :class:`OnlineRLSettings` subclass)."""

    Config: ClassVar[type[OnlineRLSettings]]
    #: Default learning rates; a settings class that redeclares ``learning_rate`` uses the same ones.
    learning_rates: ClassVar[LearningRates] = PPO_RATES
    produces = POLICY
    key_metrics = ("reward", "kl", "task_score")
    inputs = {
        "policy": Input("the policy to optimise; also the frozen reference", artifact=POLICY, default=(BASE,)),
        "reward_model": Input(
            "the reward model; a critic starts from it", artifact=REWARD_MODEL, default=(), optional=True
        ),
    }

    def data_files(self, config: OnlineRLSettings, recipe: Any) -> list[Path]:
        return data_files(config.data, recipe.dataset_dir)

    @staticmethod
    def _check_fsdp_launch(backend: Any, key: str) -> None:
        """The loop's Accelerator takes FSDP from `accelerate launch`'s environment, which torchrun, srun
        and mpirun do not set: under them it would train plain DDP, each process holding the whole model."""
        from align.launchers import outside_launcher

        launcher = outside_launcher()
        if backend.kind == "fsdp" and launcher is not None and os.environ.get("ACCELERATE_USE_FSDP") != "true":
            raise AlignError(
                f"{key}: the online-RL loop runs FSDP under align's own launch or `accelerate launch --use_fsdp`, "
                f"not under {launcher.name}",
                hint="let `align run` launch the processes itself, or start them with accelerate launch --use_fsdp",
            )

    def check(self, config: OnlineRLSettings, recipe: Any, plugins: Any) -> None:
        spec = recipe.spec_of(config)
        key = f"stages.{spec.name}"
        responses = config.batch_size * config.num_generations
        mini = config.mini_batch_size or responses
        if mini > responses:
            raise AlignError(
                f"'{key}.mini_batch_size' ({mini}) must be at most the responses per iteration "
                f"(batch_size × num_generations = {responses})",
                hint="each iteration's responses are split into minibatches of mini_batch_size",
            )
        if config.micro_batch_size is not None and config.micro_batch_size > mini:
            raise AlignError(
                f"'{key}.micro_batch_size' ({config.micro_batch_size}) must be at most mini_batch_size ({mini})",
                hint="a minibatch is split into micro-batches whose gradients accumulate",
            )
        if "reward_model" not in spec.inputs and not config.reward_functions:
            raise AlignError(
                f"stage '{spec.name}' has nothing to reward the policy with",
                hint="give it a reward_model (a reward-model stage) or reward_functions, or both",
            )
        resolve_reward_functions(config.reward_functions, plugins, f"{key}.reward_functions")
        self._check_fsdp_launch(recipe.backend, key)
        check_data(config.data, plugins, kind=PROMPTS, dataset_dir=recipe.dataset_dir, on_bad_row=config.on_bad_row)
        estimator = plugins.get("advantage estimator", config.advantage_estimator)
        build(estimator.Config, config.estimator_options, f"{key}.estimator_options")
        if (estimator.needs_groups or config.drop_uniform_groups) and config.num_generations < 2:
            needs = (
                f"the {estimator.name} estimator compares the responses to one prompt"
                if estimator.needs_groups
                else "drop_uniform_groups compares the responses to one prompt"
            )
            raise AlignError(
                f"'{key}.num_generations' is {config.num_generations}: {needs}",
                hint="set num_generations to 2 or more (GRPO commonly uses 8)",
            )
        check_engine(plugins, recipe, config.engine, config.engine_options, f"{key}.engine_options")
        check_attention(config.attn_implementation, key)
        resolve_learning_rate(config, spec, self.learning_rates)
        check_score(config.score, plugins, recipe)
        check_stage_values(recipe.backend, key, _deepspeed_values(config, key, recipe.backend), RL_FILLS, True)

    def memory(self, config: OnlineRLSettings, spec: Any, recipe: Any, plugins: Any, shape: ModelShape) -> list[Need]:
        backend = recipe.backend
        act = PRECISION_BYTES[backend.precision]
        estimator = plugins.get("advantage estimator", config.advantage_estimator)
        trained = memory.trainable(spec.peft, shape)
        needs = [memory.weights("policy", shape.parameters, memory.base_bytes(spec.peft), backend, trained=True)]
        if trained < shape.parameters:
            needs.append(Need("adapter weights", trained * 4))
        needs += memory.adam_and_gradients("policy", trained, backend)
        if estimator.needs_critic:
            needs.append(memory.weights("critic", shape.parameters, 4, backend, trained=True))
            needs += memory.adam_and_gradients("critic", shape.parameters, backend)
        frozen_where = "cpu" if config.offload_frozen_models else "device"
        if (config.kl_coef > 0 or config.beta > 0) and trained == shape.parameters:
            needs.append(
                replace(memory.weights("reference", shape.parameters, act, backend, False), where=frozen_where)
            )
        if "reward_model" in spec.inputs:
            needs.append(
                replace(memory.weights("reward model", shape.parameters, act, backend, False), where=frozen_where)
            )
        # The peak is one of two moments: training on a micro-batch, or generating and scoring a batch.
        responses = config.batch_size * config.num_generations
        length = config.max_prompt_length + config.max_new_tokens
        micro = config.micro_batch_size or config.mini_batch_size or responses
        padded = memory.padding(config.attn_implementation, length)
        training = [memory.activations(shape, micro * length, act, config.gradient_checkpointing, padded)]
        if estimator.needs_critic:  # the critic trains on the same micro-batch, beside the policy
            critic = memory.activations(shape, micro * length, act, config.gradient_checkpointing, padded)
            training.append(replace(critic, what=f"critic {critic.what}"))
        # The output layer sees the response columns only; the entropy pass holds about five copies.
        training.append(memory.logits(shape, micro * (config.max_new_tokens + 1), copies=5))
        engine = engine_named(plugins, config.engine)
        options: Any = build(engine.Config, config.engine_options, f"stages.{spec.name}.engine_options")
        chunk = config.forward_batch_size or responses
        scoring = engine.memory(options, shape, responses, length, 4)
        scoring.append(memory.logits(shape, chunk * length, copies=2, what="scoring logits"))
        needs += max(training, scoring, key=lambda part: sum(n.bytes for n in part))
        return needs

    def run(self, context: StageContext) -> Mapping[str, float]:
        return OnlineRL(context).run()


#: The statistics the NaN guard checks every step (those an algorithm has); the weights are checked too
#: before they are saved.
GUARDED = ("policy_loss", "value_loss", "kl_loss", "reward", "kl")


class OnlineRL:
    """One run of the loop. ``run`` reads top to bottom; each method below it does one thing."""

    def __init__(self, context: StageContext) -> None:
        self.context = context
        self.config: OnlineRLSettings = context.config
        config, plugins = self.config, context.plugins
        self.estimator = plugins.get("advantage estimator", config.advantage_estimator)
        self.estimator_options = build(
            self.estimator.Config, config.estimator_options, f"stages.{context.name}.estimator_options"
        )
        self.functions = resolve_reward_functions(
            config.reward_functions, plugins, f"stages.{context.name}.reward_functions"
        )
        self.engine = engine_named(plugins, config.engine)
        self.responses_per_step = config.batch_size * config.num_generations
        self.mini_batch_size = config.mini_batch_size or self.responses_per_step
        # A reference costs a forward pass per step (and, without an adapter, a model in memory).
        self.needs_reference = config.kl_coef > 0 or config.adaptive_kl or config.beta > 0
        # With one update per batch, the policy that sampled is the one the update starts from: its
        # log-probs are the update's own (detached), and a forward pass is saved (TRL does the same),
        # unless a KL penalty in the reward or a critic needs them before the update.
        self.on_policy = (
            config.ppo_epochs == 1
            and self.mini_batch_size >= self.responses_per_step
            and not self.estimator.needs_critic
            and config.kl_coef == 0
            and not config.adaptive_kl
        )
        self.score_prompts: list[Example] | None = None  # read on the first score, reused for the last
        # What the final metrics are made of, kept in every checkpoint: a resumed run reports the same.
        self.before: dict[str, float] = {}
        self.history: dict[str, list[float]] = {"reward": []}

    def run(self) -> dict[str, float]:
        config = self.config
        self._setup_accelerator()
        self._setup_models()
        self._setup_prompts()
        self._setup_optimizer()
        self._setup_engine()
        start = self._resume()
        if config.score is not None and start == 0:
            self.before["task_score_before"] = self._task_score()["task_score"]
        with self.context.progress(config.steps, done=start) as bar:
            for step in range(start, config.steps):
                started = time.perf_counter()
                batch, stats = self._rollout(self.sampler.next(config.batch_size))
                stats.update(self._optimise(batch))
                if "kl" in stats:
                    self.kl.update(stats["kl"], self.responses_per_step * self.accelerator.num_processes)
                    stats["kl_coef"] = self.kl.value
                self.session.sync(self._policy())
                stats["step_seconds"] = time.perf_counter() - started
                self.history["reward"].append(stats["reward"])
                if (step + 1) % config.logging_steps == 0 and is_main_process():
                    self.context.log_metrics(stats, step=step + 1)
                bar.update(step + 1, numbers={n: stats[n] for n in self.context.stage.key_metrics if n in stats})
                saving = bool(config.save_steps) and (step + 1) % config.save_steps == 0 and step + 1 < config.steps
                # Before the checkpoint, not after: a checkpoint of broken weights would be what a rerun resumes.
                self._stop_unless_finite(stats, step + 1, weights=saving or step + 1 == config.steps)
                if saving:
                    self._checkpoint(step + 1)
        self.session.close()
        metrics = {**self.before, "steps": float(config.steps)}
        rewards = self.history["reward"]
        if rewards:
            window = max(1, len(rewards) // 5)
            metrics.update(
                reward_first=statistics.fmean(rewards[:window]), reward_last=statistics.fmean(rewards[-window:])
            )
        if config.score is not None:
            metrics.update(self._task_score())
        self._save()
        return metrics

    # ------------------------------------------------------------------------------------------ setup
    def _setup_accelerator(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DeepSpeedPlugin, DistributedType, ProjectConfiguration, set_seed

        from align.backend import join_process_group, own_run_folders
        from align.backend_files import HIDDEN_SIZE_KEYS, deepspeed_config, fill_auto, hidden_size_fills
        from align.rl.checkpoint import Checkpoints

        backend = self.context.recipe.backend
        cpu = not torch.cuda.is_available()
        plugin = None
        if backend.kind == "deepspeed":
            # The user's config (backend.deepspeed) or align's, its "auto" values filled from the loop's
            # settings, as transformers fills them from a TRL stage's.
            values = {key: value for key, (value, _) in _deepspeed_values(self.config, "", backend).items()}
            ds_config = fill_auto(deepspeed_config(backend), values)
            if any(ds_config["zero_optimization"].get(k.split(".")[1]) == "auto" for k in HIDDEN_SIZE_KEYS):
                from transformers import AutoConfig

                hidden = AutoConfig.from_pretrained(self.context.inputs["policy"].path).hidden_size
                ds_config = fill_auto(ds_config, hidden_size_fills(hidden))
            if own_run_folders():  # each machine writes its checkpoints' shared files too
                ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
            plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
            # An earlier stage in this process left accelerate's state, its DeepSpeed plugin included, and a
            # second Accelerator may not bring one of its own: start afresh, as transformers does for each
            # trainer (the process group stays). Then set the processes up on the CPU when there is no GPU,
            # as transformers does: an Accelerator told cpu=True leaves the DeepSpeed plugin out, and
            # would silently train plain DDP instead.
            AcceleratorState._reset_state(reset_partial_state=True)
            if cpu:
                PartialState(cpu=True, backend="gloo")
        precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[backend.precision]
        self.accelerator = Accelerator(
            cpu=cpu and plugin is None,
            mixed_precision=precision,
            deepspeed_plugin=plugin,
            project_config=ProjectConfiguration(save_on_each_node=own_run_folders()),
        )
        if plugin is not None and self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise AlignError(
                f"stage '{self.context.name}': accelerate did not take the DeepSpeed config (it runs "
                f"{self.accelerator.distributed_type}); align will not train without it",
                hint="report this with your accelerate version",
            )
        join_process_group(backend)
        self.checkpoints = Checkpoints(
            self.context.output_dir / "checkpoints", self.accelerator, self.context.logger.info
        )
        # Each process samples its own prompts and responses, from a seed of its own.
        set_seed(self.config.seed + self.accelerator.process_index)
        self.device = self.accelerator.device

    def _setup_models(self) -> None:
        from align.models import load_model
        from align.rl.forward import Reference
        from align.rl.scoring import Scorer
        from align.training import load_for_training, load_tokenizer

        context, config = self.context, self.config
        self.tokenizer = load_tokenizer(context)
        self.policy = load_for_training(context, "policy", "causal")
        frozen = loading_kwargs(config.attn_implementation, context.recipe.backend)
        self.reference: Reference | None = None
        if self.needs_reference:
            # With an adapter the reference is the policy with the adapter off: no second copy in memory.
            adapter = hasattr(self.policy, "disable_adapter")
            copy = None if adapter else _frozen(load_model(context.inputs["policy"].path, **frozen))
            self.reference = Reference(copy)
        reward_input = context.inputs.get("reward_model")
        reward_model = _frozen(load_model(reward_input.path, "reward", **frozen)) if reward_input else None
        self.critic = None
        if self.estimator.needs_critic:
            critic_from = (reward_input or context.inputs["policy"]).path
            self.critic = load_model(critic_from, "reward", **loading_kwargs(config.attn_implementation))
        if config.gradient_checkpointing:
            for model in (self.policy, self.critic):
                if model is not None:  # non-reentrant: frozen embeddings (adapters) need no special care
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    _train_without_dropout(model)
        self.frozen_models = [self.reference.model if self.reference else None, reward_model]
        for model in self.frozen_models:
            if model is not None and not config.offload_frozen_models:
                model.to(self.device)  # else they wait on the CPU until a batch is scored (`_rollout`)
        self.scorer = Scorer(
            reward_model,
            self.functions,
            reward_model_weight=config.reward_model_weight,
            chunk=config.forward_batch_size,
        )

    def _setup_prompts(self) -> None:
        from align.prepare import load_prompts
        from align.render import Renderer
        from align.rl.prompts import Prompt, PromptSampler

        context, config = self.context, self.config
        rows = load_prompts(
            config.data, context.plugins, dataset_dir=context.recipe.dataset_dir, on_bad_row=config.on_bad_row
        )
        renderer = Renderer(self.tokenizer, config.max_prompt_length + config.max_new_tokens)
        prompts = [Prompt(renderer.prompt_ids(row.messages), row.columns) for row in rows]
        kept = [p for p in prompts if len(p.ids) <= config.max_prompt_length]
        if len(kept) < len(prompts):
            context.logger.info(
                "  %d prompts longer than max_prompt_length (%d) dropped",
                len(prompts) - len(kept),
                config.max_prompt_length,
            )
        world = self.accelerator.num_processes
        if len(kept) < config.batch_size * world:
            raise AlignError(
                f"stage '{context.name}': {len(kept)} prompts, fewer than batch_size ({config.batch_size}) "
                f"× {world} processes",
                hint="lower batch_size, or give the stage more prompts",
            )
        self.sampler = PromptSampler(kept, config.seed, rank=self.accelerator.process_index, world=world)

    def _setup_optimizer(self) -> None:
        import torch
        from transformers import get_scheduler

        from align.rl.forward import PolicyAndValue
        from align.rl.kl import AdaptiveKL, FixedKL, KLController

        config = self.config
        model = PolicyAndValue(self.policy, self.critic)
        parameters = [p for p in model.parameters() if p.requires_grad]
        assert config.learning_rate is not None, "the recipe check gives an unset learning rate its default"
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, eps=1e-5)  # N details 2: eps 1e-5
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Every update steps it, and there are ceil(responses / mini_batch_size) updates per epoch (fewer
        # when drop_uniform_groups leaves rows out: the rate then ends above 0). Not prepared by
        # accelerate, whose scheduler steps once per process: on 2 processes the rate reached 0 halfway.
        updates = config.steps * config.ppo_epochs * math.ceil(self.responses_per_step / self.mini_batch_size)
        self.scheduler = get_scheduler("linear", self.optimizer, num_warmup_steps=0, num_training_steps=updates)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.kl: KLController = (
            AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.adaptive_kl
            else FixedKL(config.kl_coef)
        )

    def _setup_engine(self) -> None:
        engine = self.engine
        options: Any = build(engine.Config, self.config.engine_options, f"stages.{self.context.name}.engine_options")
        engine.check(options)
        self.session = engine.start(self._policy(), self.context.inputs["policy"].path, self.tokenizer, options)

    # ------------------------------------------------------------------------------------------ steps
    def _rollout(self, prompts: list[Any]) -> tuple[Any, dict[str, float]]:
        """Generate and score: the batch the update trains on, with advantages; and its statistics."""
        import torch

        from align.reward import columns_of
        from align.rl.advantages import AdvantageInputs
        from align.rl.batch import RolloutBatch
        from align.rl.forward import policy_logprobs
        from align.rl.kl import kl_per_token
        from align.rl.masked import whiten
        from align.rollout import Sampling

        config, tokenizer = self.config, self.tokenizer
        rows = [p for p in prompts for _ in range(config.num_generations)]
        groups = [g for g in range(len(prompts)) for _ in range(config.num_generations)]
        sampling = Sampling(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=random.randrange(1 << 30)
        )
        started = time.perf_counter()
        generated = self.session.generate([p.ids for p in rows], sampling)
        generated_at = time.perf_counter()
        batch = RolloutBatch.pack(
            [p.ids for p in rows],
            generated,
            groups,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            device=self.device,
        )
        chunk = config.forward_batch_size
        if not self.on_policy:
            batch.logprobs, batch.values = policy_logprobs(self.model, batch, config.temperature, chunk)
        decode = tokenizer.decode
        asked = [decode(p.ids, skip_special_tokens=True) for p in prompts]  # once per prompt, not per response
        prompt_texts = [text for text in asked for _ in range(config.num_generations)]
        response_texts = [decode(r, skip_special_tokens=True) for r in generated]
        with (
            on_device(self.frozen_models, self.device, offload=config.offload_frozen_models),
            self._whole(self.frozen_models),
        ):
            if self.reference is not None:
                batch.ref_logprobs = self.reference.logprobs(batch, config.temperature, chunk, policy=self._policy())
            scores = self.scorer(batch, prompt_texts, response_texts, columns_of(rows))
        scored_at = time.perf_counter()

        total = scores.total
        if config.missing_eos_penalty is not None:
            total = total - config.missing_eos_penalty * (~batch.ended).float()
        if config.reward_clip is not None:
            total = total.clamp(-config.reward_clip, config.reward_clip)
        batch.scores = total
        if config.normalize_rewards:
            total = whiten(total, torch.ones_like(total), shift_mean=False)
        mask = batch.response_mask
        kl = None
        token_rewards = torch.zeros_like(mask)
        if batch.ref_logprobs is not None and batch.logprobs is not None:
            kl = kl_per_token(batch.logprobs, batch.ref_logprobs, config.kl_estimator) * mask
            token_rewards = -self.kl.value * kl
        token_rewards[torch.arange(len(batch), device=self.device), batch.response_lengths - 1] += total
        inputs = AdvantageInputs(token_rewards, mask, batch.groups, batch.values, config.gamma, config.lam)
        advantages, batch.returns = self.estimator.estimate(inputs, self.estimator_options)
        batch.advantages = whiten(advantages, mask) if config.whiten_advantages else advantages * mask

        columns = {"reward": batch.scores, **scores.parts, "response_length": batch.response_lengths.float()}
        columns["ended_share"] = batch.ended.float()
        if kl is not None:
            columns["kl"] = kl.sum(1)
        stats = self._gathered_means(columns)
        stats.update(rollout_seconds=generated_at - started, scoring_seconds=scored_at - generated_at)
        return batch, stats

    def _optimise(self, batch: Any) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates, each accumulated over micro-batches."""
        import torch
        from accelerate.utils import DistributedType

        from align.rl.advantages import group_reduce
        from align.rl.loss import Totals

        config, accelerator = self.config, self.accelerator
        rows = torch.arange(len(batch), device=self.device)
        stats: dict[str, float] = {}
        if config.drop_uniform_groups:
            informative = group_reduce(batch.scores, batch.groups, "std") > 0
            rows = rows[informative]
            stats["uniform_group_share"] = 1.0 - informative.float().mean().item()
        clip_high = config.clip_range if config.clip_range_high is None else config.clip_range_high
        sums: dict[str, list[float]] = {}
        started = time.perf_counter()
        for _ in range(config.ppo_epochs if len(rows) else 0):
            order = rows[torch.randperm(len(rows), device=self.device)]  # a new minibatch split every epoch
            for begin in range(0, len(order), self.mini_batch_size):
                minibatch = batch.select(order[begin : begin + self.mini_batch_size])
                totals = Totals.of(minibatch.response_mask, config.max_new_tokens)
                micros = list(minibatch.chunks(config.micro_batch_size))
                parts: dict[str, float] = {}
                for index, micro in enumerate(micros):
                    last = index == len(micros) - 1
                    # DeepSpeed steps at the last micro-batch only; DDP skips the all-reduce before it.
                    accelerator.sync_gradients = last
                    with nullcontext() if last else accelerator.no_sync(self.model):
                        loss, micro_parts = self._micro_loss(micro, totals, clip_high)
                        accelerator.backward(loss)
                    for name, value in micro_parts.items():
                        parts[name] = parts.get(name, 0.0) + value
                if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed clips by its config
                    accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                for name, value in parts.items():
                    sums.setdefault(name, []).append(value)
        stats.update({name: statistics.fmean(values) for name, values in sums.items()})
        stats["learning_rate"] = self.scheduler.get_last_lr()[0]
        stats["train_seconds"] = time.perf_counter() - started
        return stats

    def _micro_loss(self, micro: Any, totals: Any, clip_high: float) -> tuple[Any, dict[str, float]]:
        """One micro-batch's share of its minibatch's loss, and its share of the logged statistics."""
        import torch

        from align.rl.forward import entropy_of, logprobs_of
        from align.rl.loss import kl_loss, policy_loss, value_loss

        config = self.config
        mask = micro.response_mask
        logits, values = self.model(micro)
        logprobs = logprobs_of(logits, micro.responses, config.temperature) * mask
        policy = policy_loss(
            logprobs,
            logprobs.detach() if micro.logprobs is None else micro.logprobs,
            micro.advantages,
            mask,
            clip_low=config.clip_range,
            clip_high=clip_high,
            how=config.loss_aggregation,
            totals=totals,
        )
        loss = policy.loss
        parts = {
            "policy_loss": policy.loss.item(),
            "clip_fraction": policy.clip_fraction,
            "approx_kl": policy.approx_kl,
        }
        if values is not None:
            values = values * mask
            critic_loss, clipped = value_loss(
                values, micro.values, micro.returns, mask, clip_range=config.value_clip_range, totals=totals
            )
            loss = loss + config.value_coef * critic_loss
            parts.update(value_loss=critic_loss.item(), value_clip_fraction=clipped)
        if config.beta > 0:
            term = kl_loss(logprobs, micro.ref_logprobs, mask, how=config.loss_aggregation, totals=totals)
            loss = loss + config.beta * term
            parts["kl_loss"] = term.item()
        with torch.no_grad():
            parts["entropy"] = (entropy_of(logits, config.temperature) * mask).sum().item() / totals.tokens
        return loss, parts

    # ------------------------------------------------------------------------------------------ helpers
    def _whole(self, models: list[Any]) -> AbstractContextManager[Any]:
        """Under ZeRO-3 every model loaded once the DeepSpeed config is made comes partitioned, the frozen
        ones too, and they have no engine whose hooks gather their weights for a forward pass: gather them
        (in every process, for the block; as TRL does for generation) while they score."""
        plugin = self.accelerator.state.deepspeed_plugin if self.accelerator.distributed_type == "DEEPSPEED" else None
        if plugin is None or plugin.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for m in models if m is not None for p in m.parameters()])

    def _policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model).policy

    def _gathered_means(self, columns: Mapping[str, Any]) -> dict[str, float]:
        """The mean of each per-response column over every process's responses."""
        import torch

        names = list(columns)
        table = torch.stack([columns[n].float() for n in names]).T.contiguous()
        gathered = self.accelerator.gather_for_metrics(table)
        return {name: gathered[:, i].mean().item() for i, name in enumerate(names)}

    def _task_score(self) -> dict[str, float]:
        from align.task_score import score_prompts, task_score

        assert self.config.score is not None
        if self.score_prompts is None:  # read once: the policy is scored before and after
            self.score_prompts = score_prompts(self.config.score, self.context)
        return task_score(self._policy(), self.tokenizer, self.config.score, self.context, self.score_prompts)

    def _stop_unless_finite(self, stats: Mapping[str, float], step: int, weights: bool) -> None:
        """Raise if a guarded statistic (or, with ``weights``, a weight) of any process is not a finite number.

        Every process takes the same decision: one raising while another writes a checkpoint would hang.
        """
        import torch

        guarded = [name for name in GUARDED if name in stats]
        local_weights = not weights or all(
            bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())  # ds_tensor: this process's ZeRO-3 shard
            for p in self.model.parameters()
        )
        # float64: a large but finite float (a value loss of 1e39, say) must not read as infinite.
        local = torch.tensor(
            [*(stats[n] for n in guarded), float(local_weights)], dtype=torch.float64, device=self.device
        )
        gathered = self.accelerator.gather(local).reshape(self.accelerator.num_processes, len(guarded) + 1).cpu()
        bad = {
            name: next(v for v in gathered[:, i].tolist() if not math.isfinite(v))
            for i, name in enumerate(guarded)
            if not torch.isfinite(gathered[:, i]).all()
        }
        weights_bad = bool((gathered[:, -1] == 0).any())
        if not bad and not weights_bad:
            return
        kept = self.checkpoints.complete()
        where = f"the last good checkpoint, {kept[0][0]}, is kept" if kept else "no checkpoint was saved before it"
        if bad:
            name = next((n for n in bad if n.endswith("_loss")), next(iter(bad)))
            details = ", ".join(f"{n} {value}" for n, value in bad.items())
            what = f"the {'loss' if name.endswith('_loss') else name} became {bad[name]} at step {step} ({details})"
        else:
            what = f"the weights stopped being finite numbers at step {step}"
        raise AlignError(
            f"{what}; training stopped and {where}",  # the runner names the stage
            hint="lower learning_rate or kl_coef, or look for a reward model or reward function that returns NaN "
            "or infinity; rerunning the recipe unchanged resumes from the last good checkpoint",
        )

    def _checkpoint(self, step: int) -> None:
        from align.rl.checkpoint import RLState

        state = RLState(
            step=step,
            processes=self.accelerator.num_processes,
            kl_coef=self.kl.value,
            before=self.before,
            history=self.history,
        )
        self.checkpoints.save(state, {"sampler": self.sampler.state_dict()})

    def _resume(self) -> int:
        complete = self.checkpoints.complete()
        if not complete:
            return 0
        folder, state = complete[0]
        if state.processes != self.accelerator.num_processes:
            raise AlignError(
                f"stage '{self.context.name}': checkpoint {folder} was written by {state.processes} processes "
                f"and this run has {self.accelerator.num_processes}",
                hint="run it with the backend it was written with, or delete the folder to start the stage afresh",
            )
        process_state = self.checkpoints.load(folder)
        self.sampler.load_state_dict(process_state["sampler"])
        self.kl.value, self.before, self.history = state.kl_coef, state.before, state.history
        self.session.sync(self._policy())
        self.context.logger.info("  resuming from %s", folder)
        return state.step

    def _save(self) -> None:
        self.accelerator.wait_for_everyone()
        policy = self._policy()
        state = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards on every process
        if is_main_process():  # rank 0, or each machine's first process when it keeps its own run folder
            save_on_this_machine(policy)
            policy_state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
            policy.save_pretrained(self.context.output_dir, state_dict=policy_state)
            self.tokenizer.save_pretrained(self.context.output_dir)
            self.checkpoints.remove()
        self.accelerator.wait_for_everyone()


def _deepspeed_values(config: OnlineRLSettings, key: str, backend: Any) -> dict[str, tuple[Any, str]]:
    """The DeepSpeed keys the loop fills, each with its value and where that comes from: the loop drives
    accumulation over micro-batches itself (accelerator.sync_gradients), so DeepSpeed accumulates nothing
    and scales nothing, and clips at the loop's norm."""
    responses = config.batch_size * config.num_generations
    micro = config.micro_batch_size or config.mini_batch_size or responses
    if config.micro_batch_size:
        where = f"{key}.micro_batch_size"
    elif config.mini_batch_size:
        where = f"{key}.mini_batch_size (micro_batch_size is not set)"
    else:
        where = f"{key}.batch_size × num_generations (neither mini_batch_size nor micro_batch_size is set)"
    return {
        "train_micro_batch_size_per_gpu": (micro, where),
        "gradient_accumulation_steps": (1, "DeepSpeed's accumulation in the online-RL loop (which accumulates itself)"),
        "train_batch_size": (micro * backend.world_size, f"{where} × {backend.world_size} process(es)"),
        "gradient_clipping": (1.0, "the online-RL loop's clipping norm"),
        "bf16.enabled": (backend.precision == "bf16", "backend.precision"),
        "fp16.enabled": (backend.precision == "fp16", "backend.precision"),
    }


def _train_without_dropout(model: Any) -> None:
    """Training mode, which transformers checkpoints only in, with dropout off as in the eval mode the loop
    otherwise runs in: checkpointing must change memory, not what is learned."""
    import torch

    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0


def _frozen(model: Any) -> Any:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model
