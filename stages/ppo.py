"""``ppo``: proximal policy optimisation from a reward model and/or reward functions.

TRL no longer ships a PPO trainer, so this is align's own loop on accelerate, in the form of InstructGPT
(Ouyang et al. 2022) as "The N Implementation Details of RLHF with PPO" (Huang et al. 2023, "N details")
describes it. Each step:

1. sample a batch of prompts and generate responses through a rollout engine (``hf``, ``vllm``, …);
2. score each response: the reward model at its last token and/or reward functions, minus a penalty if
   it never ended (no EOS);
3. compute per-token rewards: the score at the last token, minus ``kl_coef`` × the per-token KL to the
   reference (the frozen input policy);
4. estimate advantages with GAE from the value model (initialised from the reward model), whiten them;
5. take ``ppo_epochs`` passes over the batch in minibatches, with the clipped policy and value losses;
6. push the new weights to the engine and adapt the KL coefficient.

Checkpoints (every ``save_steps``) hold the policy and value weights, optimizer, scheduler, KL
controller, random state, the position in the prompts and what the final metrics need (the task score
before training, every step's reward), so a killed run continues where it stopped and reports what an
uninterrupted one would. Each is written into a ``.partial-step-N`` folder, its state file last, and
renamed to ``step-N`` when complete; the previous one is deleted only then, and a step folder that fails
its state file's checks is skipped on resume for the previous complete one. A non-finite loss stops the
stage before its checkpoint is written, so the last checkpoint on disk is always a good one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align import AlignError, hookimpl
from align.data import DataSource, data_setting, on_bad_row_setting
from align.peft_method import peft_setting
from align.prepare import data_files
from align.schema import MAX_SEED, build, setting
from align.stage import BASE, POLICY, REWARD_MODEL, Input, Stage, StageContext
from align.task_score import ScoreSettings, check_score, score_setting


@dataclass
class PPOSettings:
    data: str | list[str | DataSource] = data_setting()
    on_bad_row: Literal["error", "skip"] = on_bad_row_setting()
    peft: dict[str, Any] = peft_setting()
    engine: str = setting("hf", help="The rollout engine that generates responses: hf (transformers), vllm, ….")
    engine_options: dict[str, Any] = setting(
        default_factory=dict, help="The engine's own settings (`align explain ENGINE`), e.g. {batch_size: 32}."
    )
    reward_functions: list[str] = setting(
        default_factory=list, help="Rules added to the reward model's score (or used alone), e.g. [sentiment]."
    )
    reward_model_weight: float = setting(1.0, help="Weight of the reward model's score in the reward.", minimum=0)
    steps: int = setting(
        100, help="PPO iterations: each generates a batch, scores it and updates the policy.", minimum=1
    )
    batch_size: int = setting(32, help="Prompts per iteration on each process.", minimum=1)
    mini_batch_size: int = setting(8, help="Responses per gradient step within an iteration.", minimum=1)
    ppo_epochs: int = setting(4, help="Passes over each iteration's batch (InstructGPT and TRL use 4).", minimum=1)
    # 1.41e-5: TRL's gpt2-sentiment example (reference_values: trl_gpt2_sentiment_notebook_source).
    learning_rate: float = setting(
        1.41e-5, help="Learning rate of the policy and value model (Adam, eps 1e-5).", above=0
    )
    max_prompt_length: int = setting(256, help="Tokens of prompt; longer prompts are dropped and counted.", minimum=1)
    max_new_tokens: int = setting(48, help="Longest response.", minimum=1)
    # Above 0, unlike score's: the log-probabilities are divided by it, so there is no greedy PPO.
    temperature: float = setting(
        1.0, help="Sampling temperature, also applied to the log-probabilities (N details 11).", above=0
    )
    # 0.05 and k1: TRL's PPOConfig defaults.
    kl_coef: float = setting(
        0.05, help="Weight of the per-token KL penalty (its starting value if adaptive).", minimum=0
    )
    kl_estimator: Literal["k1", "k3"] = setting(
        "k1", help="k1 = log p - log q (unbiased); k3 (unbiased, never negative, lower variance)."
    )
    adaptive_kl: bool = setting(False, help="Adapt kl_coef towards kl_target (Ziegler et al. 2019).")
    # 6.0 and 10000: lm-human-preferences' AdaptiveKLController (reference_values: adaptive_kl_controller).
    # Both divide the controller's update: 0 would be a division by zero at the first step.
    kl_target: float = setting(6.0, help="KL (nats per response) the adaptive controller aims at.", above=0)
    kl_horizon: float = setting(10000.0, help="How slowly the adaptive controller moves.", above=0)
    # gamma 1, lambda 0.95, clip 0.2 / 0.2, value coefficient 0.1: TRL's PPOConfig defaults.
    gamma: float = setting(1.0, help="Discount of future rewards within a response.", minimum=0, maximum=1)
    lam: float = setting(
        0.95, help="GAE λ: lower trusts the value model more (less variance, more bias).", minimum=0, maximum=1
    )
    clip_range: float = setting(0.2, help="PPO ratio clipping.", above=0)
    value_clip_range: float = setting(0.2, help="Clipping of the value update.", above=0)
    value_coef: float = setting(0.1, help="Weight of the value loss.", minimum=0)
    whiten_advantages: bool = setting(True, help="Normalise advantages per batch (N details 9).")
    normalize_rewards: bool = setting(False, help="Normalise scores per batch (mean kept) before the KL penalty.")
    reward_clip: float | None = setting(None, help="Clip scores to [-reward_clip, reward_clip].", above=0)
    missing_eos_penalty: float | None = setting(
        None, help="Subtract this from the score of a response that never ended (N details 13).", minimum=0
    )
    logging_steps: int = setting(1, help="Log metrics every this many iterations.", minimum=1)
    save_steps: int = setting(20, help="Checkpoint every this many iterations, for resuming (0: never).", minimum=0)
    seed: int = setting(42, help="Seed of prompt order, sampling and initialisation.", minimum=0, maximum=MAX_SEED)
    score: ScoreSettings | None = score_setting()


class PPOStage(Stage):
    """PPO from a reward model and/or reward functions, on align's own loop (accelerate)."""

    name = "ppo"
    Config = PPOSettings
    produces = POLICY
    inputs = {
        "policy": Input("the policy to optimise; also the frozen reference", artifact=POLICY, default=(BASE,)),
        "reward_model": Input(
            "the reward model; the value model starts from it", artifact=REWARD_MODEL, default=(), optional=True
        ),
    }

    def data_files(self, config: PPOSettings, recipe: Any) -> list[Path]:
        return data_files(config.data, recipe.dataset_dir)

    def check(self, config: PPOSettings, recipe: Any, plugins: Any) -> None:
        # check() is handed the settings, not the stage's name in the recipe: find it, for the key paths.
        spec = next(s for s in recipe.stages.values() if s.config is config)
        if config.mini_batch_size > config.batch_size:
            raise AlignError(
                f"'stages.{spec.name}.mini_batch_size' ({config.mini_batch_size}) must be at most "
                f"batch_size ({config.batch_size})",
                hint="each iteration's batch of responses is split into minibatches of mini_batch_size",
            )
        if "reward_model" not in spec.inputs and not config.reward_functions:
            raise AlignError(
                f"stage '{spec.name}' has nothing to reward the policy with",
                hint="give it a reward_model (an rm stage) or reward_functions: [sentiment], or both",
            )
        for name in config.reward_functions:
            plugins.get("reward function", name)
        engine = plugins.get("rollout engine", config.engine)
        engine.check(build(engine.Config, config.engine_options, f"stages.{self.name}.engine_options"))
        check_score(config.score, plugins)

    def run(self, context: StageContext) -> Mapping[str, float]:
        return _PPO(context).run()


#: The version of the checkpoint layout below; a checkpoint of another version is skipped, not misread.
CHECKPOINT_FORMAT = 1
#: Written last into a checkpoint: while it is missing, the checkpoint is incomplete.
STATE_FILE = "align_ppo_state.json"
#: Where a checkpoint is written before it is complete (``step-N`` names only complete ones).
PARTIAL = ".partial-"
#: The statistics the NaN guard checks every step; the weights are checked too before they are saved.
GUARDED = ("policy_loss", "value_loss", "reward", "kl")


class _PPO:
    """One PPO run. ``run`` reads top to bottom; the helpers below it do one thing each."""

    def __init__(self, context: StageContext) -> None:
        self.context = context
        self.config: PPOSettings = context.config
        self.checkpoints = context.output_dir / "checkpoints"
        if "reward_model" not in context.inputs and not self.config.reward_functions:
            raise AlignError(
                f"stage '{context.name}' has nothing to reward the policy with",
                hint="give it a reward_model (an rm stage) or reward_functions: [sentiment], or both",
            )
        if self.config.mini_batch_size > self.config.batch_size:
            raise AlignError(f"stage '{context.name}': mini_batch_size is larger than batch_size")
        self.reward_functions = [context.plugins.get("reward function", n) for n in self.config.reward_functions]
        self.engine = context.plugins.get("rollout engine", self.config.engine)
        # What the final metrics are made of, kept in every checkpoint: a resumed run reports the same.
        self.before: dict[str, float] = {}
        self.rewards: list[float] = []

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
        for step in range(start, config.steps):
            started = time.perf_counter()
            batch = self._rollout(self._next_prompts())
            stats = self._optimise(batch)
            self.kl.update(stats["kl"], config.batch_size * self.accelerator.num_processes)
            self.session.sync(self._policy())
            stats.update(kl_coef=self.kl.value, step_seconds=time.perf_counter() - started)
            self.rewards.append(stats["reward"])
            if (step + 1) % config.logging_steps == 0 and self.accelerator.is_main_process:
                self.context.log_metrics(stats, step=step + 1)
                self.context.logger.info(
                    "  step %d/%d: reward %.3f, kl %.3f, length %.1f",
                    step + 1,
                    config.steps,
                    stats["reward"],
                    stats["kl"],
                    stats["response_length"],
                )
            saving = bool(config.save_steps) and (step + 1) % config.save_steps == 0 and step + 1 < config.steps
            # Before the checkpoint, not after: a checkpoint of broken weights would be what a rerun resumes.
            self._stop_unless_finite(stats, step + 1, weights=saving or step + 1 == config.steps)
            if saving:
                self._checkpoint(step + 1)
        self.session.close()
        metrics = {**self.before, "steps": float(config.steps)}
        if self.rewards:
            window = max(1, len(self.rewards) // 5)
            metrics.update(
                reward_first=statistics.fmean(self.rewards[:window]),
                reward_last=statistics.fmean(self.rewards[-window:]),
            )
        if config.score is not None:
            metrics.update(self._task_score())
        self._save()
        return metrics

    # ------------------------------------------------------------------------------------------ setup
    def _setup_accelerator(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, set_seed

        from align.backend import join_process_group, trainer_arguments

        backend = self.context.recipe.backend
        plugin = None
        if backend.kind == "deepspeed":
            ds_config = trainer_arguments(backend)["deepspeed"]
            ds_config.update(train_micro_batch_size_per_gpu=self.config.mini_batch_size, gradient_accumulation_steps=1)
            ds_config.pop("train_batch_size")
            ds_config["gradient_clipping"] = 1.0
            ds_config["bf16"] = {"enabled": backend.precision == "bf16"}
            ds_config["fp16"] = {"enabled": backend.precision == "fp16"}
            plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
        precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[backend.precision]
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=precision, deepspeed_plugin=plugin
        )
        join_process_group(backend)
        # Each process samples its own prompts and responses, from a seed of its own.
        set_seed(self.config.seed + self.accelerator.process_index)

    def _setup_models(self) -> None:

        from align.models import load_model
        from align.training import load_for_training, load_tokenizer

        context = self.context
        self.tokenizer = load_tokenizer(context)
        self.policy = load_for_training(context, "policy", "causal")
        self.uses_adapter = hasattr(self.policy, "disable_adapter")
        # With an adapter the reference is the policy with the adapter off: no second copy in memory.
        self.reference = None if self.uses_adapter else _frozen(load_model(context.inputs["policy"].path))
        reward_input = context.inputs.get("reward_model")
        self.reward_model = _frozen(load_model(reward_input.path, "reward")) if reward_input else None
        value_source = reward_input.path if reward_input else context.inputs["policy"].path
        self.value_model = load_model(value_source, "reward")
        self.device = self.accelerator.device
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.to(self.device)

    def _setup_prompts(self) -> None:
        from align.prepare import load_prompts
        from align.render import Renderer

        context, config = self.context, self.config
        prompts = load_prompts(
            config.data, context.plugins, dataset_dir=context.recipe.dataset_dir, on_bad_row=config.on_bad_row
        )
        renderer = Renderer(self.tokenizer, config.max_prompt_length + config.max_new_tokens)
        ids = [renderer.prompt_ids(p) for p in prompts]
        self.prompts = [p for p in ids if len(p) <= config.max_prompt_length]
        dropped = len(ids) - len(self.prompts)
        if dropped:
            context.logger.info(
                "  %d prompts longer than max_prompt_length (%d) dropped", dropped, config.max_prompt_length
            )
        if len(self.prompts) < config.batch_size:
            raise AlignError(
                f"stage '{context.name}': {len(self.prompts)} prompts, fewer than batch_size ({config.batch_size})"
            )
        self.order: list[int] = []
        self.position = 0
        self.epoch = 0

    def _setup_optimizer(self) -> None:
        import torch
        from transformers import get_scheduler

        from align.stages.ppo_model import PolicyAndValue

        self.model = PolicyAndValue(self.policy, self.value_model)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.config.learning_rate, eps=1e-5)  # N details 2: eps 1e-5
        updates = (
            self.config.steps * self.config.ppo_epochs * max(1, self.config.batch_size // self.config.mini_batch_size)
        )
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=updates)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        from align.stages.ppo_math import AdaptiveKL, FixedKL

        self.kl = (
            AdaptiveKL(self.config.kl_coef, self.config.kl_target, self.config.kl_horizon)
            if self.config.adaptive_kl
            else FixedKL(self.config.kl_coef)
        )

    def _setup_engine(self) -> None:
        from align.schema import build

        engine = self.engine
        options = build(engine.Config, self.config.engine_options, f"stages.{self.context.name}.engine_options")
        engine.check(options)
        self.session = engine.start(self._policy(), self.context.inputs["policy"].path, self.tokenizer, options)

    # ------------------------------------------------------------------------------------------ steps
    def _next_prompts(self) -> list[list[int]]:
        """The next batch of prompts for this process; the order is reshuffled every epoch, by seed."""
        batch: list[list[int]] = []
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        while len(batch) < self.config.batch_size:
            if self.position >= len(self.order):
                self.order = list(range(len(self.prompts)))
                random.Random(self.config.seed + self.epoch).shuffle(self.order)
                self.position, self.epoch = 0, self.epoch + 1
            index = self.order[self.position]
            self.position += 1
            if index % world == rank:
                batch.append(self.prompts[index])
        return batch

    def _rollout(self, prompts: list[list[int]]) -> dict[str, Any]:
        """Generate, score, and compute everything the update needs, without gradients."""
        import torch

        from align.rollout import Sampling
        from align.sequences import pack
        from align.stages.ppo_math import gae, kl_per_token, whiten

        config, tokenizer = self.config, self.tokenizer
        sampling = Sampling(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=random.randrange(1 << 30)
        )
        started = time.perf_counter()
        responses = self.session.generate(prompts, sampling)
        responses = [r if r else [tokenizer.eos_token_id] for r in responses]
        generated = time.perf_counter()
        batch = pack(prompts, responses, tokenizer.pad_token_id, self.device)
        with torch.no_grad():
            logits, values = self.model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            logprobs = self._response_logprobs(logits, batch)
            values = values[:, batch["prompt_width"] - 1 : -1]
            ref_logits = self._reference_logits(batch)
            ref_logprobs = self._response_logprobs(ref_logits, batch)
            scores = self._scores(prompts, responses, batch)
        mask = batch["response_mask"]
        scored = time.perf_counter()
        ended = torch.tensor([tokenizer.eos_token_id in r for r in responses], device=self.device)
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~ended).float()
        if config.reward_clip is not None:
            scores = scores.clamp(-config.reward_clip, config.reward_clip)
        raw_scores = scores
        if config.normalize_rewards:
            scores = whiten(scores, torch.ones_like(scores), shift_mean=False)
        kl = kl_per_token(logprobs, ref_logprobs, config.kl_estimator) * mask
        rewards = -self.kl.value * kl
        last = batch["response_lengths"] - 1
        rewards[torch.arange(len(responses), device=self.device), last] += scores
        values = values * mask
        advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)
        return {
            **batch,
            "logprobs": logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": raw_scores,
            "kl": kl.sum(1),
            "ended": ended,
            # Scoring includes the reference, reward and value forward passes: everything before the update.
            "seconds": {"rollout_seconds": generated - started, "scoring_seconds": scored - generated},
        }

    def _optimise(self, batch: dict[str, Any]) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates; returns the step's statistics."""
        import torch
        from accelerate.utils import DistributedType

        from align.stages.ppo_math import entropy_of, masked_mean, ppo_loss

        config = self.config
        count = batch["input_ids"].shape[0]
        parts, entropies = [], []
        started = time.perf_counter()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(count, device=self.device)  # a new minibatch split every epoch
            for begin in range(0, count, config.mini_batch_size):
                rows = order[begin : begin + config.mini_batch_size]
                mini = {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
                logits, values = self.model(mini["input_ids"], mini["attention_mask"], mini["position_ids"])
                logprobs = self._response_logprobs(logits, mini)
                values = values[:, mini["prompt_width"] - 1 : -1]
                loss = ppo_loss(
                    logprobs,
                    mini["logprobs"],
                    mini["advantages"],
                    values,
                    mini["values"],
                    mini["returns"],
                    mini["response_mask"],
                    config.clip_range,
                    config.value_clip_range,
                    config.value_coef,
                )
                self.accelerator.backward(loss.loss)
                if self.accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed clips by its config
                    self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                parts.append(loss)
                with torch.no_grad():
                    response_logits = logits[:, mini["prompt_width"] - 1 : -1]
                    entropies.append(masked_mean(entropy_of(response_logits), mini["response_mask"]).item())
        gathered = self.accelerator.gather_for_metrics(
            torch.stack(
                [batch["scores"], batch["kl"], batch["response_lengths"].float(), batch["ended"].float()]
            ).T.contiguous()
        )
        return {
            "reward": gathered[:, 0].mean().item(),
            "kl": gathered[:, 1].mean().item(),
            "response_length": gathered[:, 2].mean().item(),
            "ended_share": gathered[:, 3].mean().item(),
            "entropy": statistics.fmean(entropies),
            "policy_loss": statistics.fmean(p.policy_loss for p in parts),
            "value_loss": statistics.fmean(p.value_loss for p in parts),
            "clip_fraction": statistics.fmean(p.clip_fraction for p in parts),
            "value_clip_fraction": statistics.fmean(p.value_clip_fraction for p in parts),
            "approx_kl": statistics.fmean(p.approx_kl for p in parts),
            "learning_rate": self.scheduler.get_last_lr()[0],
            **batch["seconds"],
            "train_seconds": time.perf_counter() - started,
        }

    # ------------------------------------------------------------------------------------------ helpers
    def _policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model).policy

    def _response_logprobs(self, logits: Any, batch: dict[str, Any]) -> Any:
        from align.stages.ppo_math import logprobs_of

        response_logits = logits[:, batch["prompt_width"] - 1 : -1]
        return (
            logprobs_of(response_logits.float(), batch["responses"], self.config.temperature) * batch["response_mask"]
        )

    def _reference_logits(self, batch: dict[str, Any]) -> Any:
        arguments = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if self.reference is not None:
            return self.reference(**arguments).logits
        policy = self._policy()
        with policy.disable_adapter():
            return policy(**arguments).logits

    def _scores(self, prompts: list[list[int]], responses: list[list[int]], batch: dict[str, Any]) -> Any:
        import torch

        from align.sequences import token_values

        scores = torch.zeros(len(responses), device=self.device)
        if self.reward_model is not None:
            last = batch["prompt_width"] + batch["response_lengths"] - 1
            hidden = token_values(self.reward_model, batch)
            scores += self.config.reward_model_weight * hidden[torch.arange(len(responses), device=self.device), last]
        if self.reward_functions:
            decode = self.tokenizer.decode
            prompt_texts = [decode(p, skip_special_tokens=True) for p in prompts]
            response_texts = [decode(r, skip_special_tokens=True) for r in responses]
            for function in self.reward_functions:
                scores += torch.tensor(function(prompt_texts, response_texts), device=self.device, dtype=scores.dtype)
        return scores

    def _task_score(self) -> dict[str, float]:
        from align.task_score import task_score

        assert self.config.score is not None
        return task_score(self._policy(), self.tokenizer, self.config.score, self.context)

    def _stop_unless_finite(self, stats: Mapping[str, float], step: int, weights: bool) -> None:
        """Raise if a guarded statistic (or, with ``weights``, a weight) of any process is not a finite number.

        Every process takes the same decision: one raising while another writes a checkpoint would hang.
        """
        import torch

        # The losses are each process's own; the reward and KL are gathered already, and gathered again
        # here only so that one tensor carries everything.
        values = [stats[name] for name in GUARDED]
        local_weights = not weights or all(
            bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())  # ds_tensor: this process's ZeRO-3 shard
            for p in self.model.parameters()
        )
        # float64: a large but finite float (a value loss of 1e39, say) must not read as infinite.
        local = torch.tensor([*values, float(local_weights)], dtype=torch.float64, device=self.device)
        gathered = self.accelerator.gather(local)
        gathered = gathered.reshape(self.accelerator.num_processes, len(GUARDED) + 1).cpu()
        bad = {
            name: next(v for v in gathered[:, i].tolist() if not _finite(v))
            for i, name in enumerate(GUARDED)
            if not torch.isfinite(gathered[:, i]).all()
        }
        weights_bad = bool((gathered[:, -1] == 0).any())
        if not bad and not weights_bad:
            return
        kept = self._complete_checkpoints()
        where = f"the last good checkpoint, {kept[0][0]}, is kept" if kept else "no checkpoint was saved before it"
        if bad:
            name = next((n for n in ("policy_loss", "value_loss") if n in bad), next(iter(bad)))
            details = ", ".join(f"{n} {value}" for n, value in bad.items())
            what = f"the PPO {'loss' if name.endswith('_loss') else name} became {bad[name]} at step {step} ({details})"
        else:
            what = f"the PPO weights stopped being finite numbers at step {step}"
        raise AlignError(
            f"{what}; training stopped and {where}",  # the runner names the stage
            hint="lower learning_rate or kl_coef, or look for a reward model or reward function that returns NaN "
            "or infinity; rerunning the recipe unchanged resumes from the last good checkpoint",
        )

    def _checkpoint(self, step: int) -> None:
        """Write ``step-N`` so that it is complete or absent, then delete the checkpoints before it.

        Every process writes its part into ``.partial-step-N``; the main process then writes the state
        file, last, listing every file with its size, and renames the folder. A kill at any moment leaves
        the previous complete checkpoint in place.
        """
        import torch

        accelerator = self.accelerator
        final = self.checkpoints / f"step-{step}"
        partial = self.checkpoints / f"{PARTIAL}step-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        # What differs between processes, one file each: every process walks the prompts to its own
        # position, and draws from its own generators. accelerate saves the random states too, but its
        # load_state only logs (at info) when it cannot restore them: these are listed and checked.
        torch.save(self._process_state(), partial / f"align_process_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()  # every process's files are written before the state file lists them
        if accelerator.is_main_process:
            files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "processes": accelerator.num_processes,
                "files": files,
                "kl_coef": self.kl.value,
                "before": self.before,
                "rewards": self.rewards,
            }
            (partial / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)  # an incomplete step-N that the resume skipped
            os.replace(partial, final)
            for other in self.checkpoints.iterdir():  # older checkpoints, and incomplete ones skipped
                if other != final:
                    shutil.rmtree(other, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _complete_checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        """The complete checkpoints, newest first, with their state; incomplete ones are logged and skipped."""
        found = []
        for folder in self.checkpoints.glob("*"):
            number = folder.name.removeprefix("step-")
            if folder.name.startswith(PARTIAL):
                self.context.logger.info("  skipping %s: the run stopped while writing it", folder)
            elif folder.is_dir() and number.isdigit():
                found.append((int(number), folder))
        complete = []
        for step, folder in sorted(found, reverse=True):
            state, problem = _read_state(folder, step)
            if state is None:
                self.context.logger.info("  skipping %s: %s", folder, problem)
            else:
                complete.append((folder, state))
        return complete

    def _process_state(self) -> dict[str, Any]:
        """This process's place in the prompts, and its random generators (sampling seeds, minibatch order)."""
        import torch

        state: dict[str, Any] = {
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
            "python": random.getstate(),
            "torch": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _resume(self) -> int:
        import torch

        complete = self._complete_checkpoints()
        if not complete:
            return 0
        folder, state = complete[0]
        if state["processes"] != self.accelerator.num_processes:
            raise AlignError(
                f"stage '{self.context.name}': checkpoint {folder} was written by {state['processes']} processes "
                f"and this run has {self.accelerator.num_processes}",
                hint="run it with the backend it was written with, or delete the folder to start the stage afresh",
            )
        self.accelerator.load_state(str(folder))
        self.kl.value = state["kl_coef"]
        self.before, self.rewards = state["before"], state["rewards"]
        saved = torch.load(folder / f"align_process_{self.accelerator.process_index}.pt", weights_only=True)
        self.order, self.position, self.epoch = saved["order"], saved["position"], saved["epoch"]
        random.setstate(saved["python"])
        torch.random.set_rng_state(saved["torch"])
        if "cuda" in saved:
            torch.cuda.set_rng_state_all(saved["cuda"])
        self.session.sync(self._policy())
        self.context.logger.info("  resuming from %s", folder)
        return int(state["step"])

    def _save(self) -> None:
        self.accelerator.wait_for_everyone()
        policy = self._policy()
        state = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards on every process
        if self.accelerator.is_main_process:
            policy_state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
            policy.save_pretrained(self.context.output_dir, state_dict=policy_state)
            self.tokenizer.save_pretrained(self.context.output_dir)
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def _frozen(model: Any) -> Any:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model


def _finite(value: float) -> bool:
    import math

    return math.isfinite(value)


def _read_state(folder: Path, step: int) -> tuple[dict[str, Any] | None, str]:
    """A checkpoint's state, or None and why it cannot be resumed from (a kill while writing it, say)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None, f"it has no {STATE_FILE} (the run stopped while writing it)"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"its {STATE_FILE} cannot be read ({error})"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        return None, f"its checkpoint format is {found!r} and this align reads format {CHECKPOINT_FORMAT}"
    if state.get("step") != step:
        return None, f"its {STATE_FILE} is for step {state.get('step')}, not {step}"
    for name, size in state["files"].items():
        file = folder / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != size:
            return None, f"{name} has {file.stat().st_size} bytes, not the {size} it was written with"
    return state, ""


@hookimpl
def align_register_stages() -> list[Stage]:
    return [PPOStage()]
