"""One GRPO step of align against TRL 1.16's GRPOTrainer: the same model, prompts, group and update.

    OMP_NUM_THREADS=1 python bench/grpo_step.py [--steps 6] [--repeat 1] [--threads 1] [--model tiny-llama]
        [--prompts 8] [--generations 8] [--max-new-tokens 24] [--gradient-checkpointing] [--micro-batch-size N]

Both sides train the model of `--model` (default the tiny Llama, align's `tiny-llama` model source;
`smollm2` or a folder: see common.py; built or converted once here, the same folder is given to both) on
`demo_prompts` rendered with its chat template, with the rule-based `sentiment` reward of align (wrapped as
a TRL reward function on TRL's side). Settings, the same on both sides (the sizes are the defaults of
`--prompts`, `--generations` and `--max-new-tokens`):

* 8 prompts × num_generations 8 = 64 completions per step, up to 24 new tokens, temperature 1, top-k 0,
  top-p 1, plain transformers `generate` (TRL: use_vllm False);
* one optimizer step per generation batch, the whole 64 completions in one forward and backward pass
  (align: batch_size 8, mini_batch_size and micro_batch_size unset, ppo_epochs 1; TRL:
  per_device_train_batch_size 64 × gradient_accumulation_steps 1 = generation_batch_size 64,
  num_iterations 1);
* beta 0 (no reference model), group-scaled advantages, token-level (DAPO) loss, clip 0.2,
  learning rate 1e-6 with linear decay, AdamW eps 1e-5, weight decay 0.01, gradient clipping 1.0,
  CPU, fp32, one process, seed 42, `--threads` torch threads;
* `--gradient-checkpointing`: on for both (align's `gradient_checkpointing: true`; TRL's
  `gradient_checkpointing=True`, both non-reentrant);
* `--micro-batch-size N`: N completions per forward and backward pass, gradients accumulated over the 64
  for the one optimizer step (align: `micro_batch_size` and `forward_batch_size` N; TRL:
  per_device_train_batch_size N × gradient_accumulation_steps 64/N, so steps_per_generation 64/N and
  generation_batch_size still 64).

Each side runs in a fresh process (neither warms the other). align runs through
`align.runner.run_recipe`; its per-step figures are those of its metrics file
(logs/grpo.metrics.jsonl): step_seconds and its parts, plus the wall interval between two metrics lines
(which adds the loop's logging and NaN guard). TRL's step is timed by a callback from on_step_begin to
on_step_end (generation happens inside it, in `_prepare_inputs`), and the interval between two
on_step_end calls; its parts by wrapping `_generate` (generation) and `_generate_and_score_completions`
(generation + rewards + log-prob bookkeeping). The `cpu` column is the process's CPU seconds over the
step (align: from the start of `_rollout` to the end of `_optimise`, wrapped from the outside; TRL: from
on_step_begin to on_step_end): unlike wall time it leaves out the time the process waited for a core
on a shared machine. The first step of each side is left out (warm-up). The prompts drawn differ (each
side's own shuffling), so completion lengths are printed to show both generate 64 completions of up to
24 tokens per step. The ratios are printed for the medians over `--repeat` runs and for the fastest
run of each side (interference only adds time). Each child's peak resident set (ru_maxrss: loading,
generation and training together) is printed with its run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_model_argument, model_folder, recipe_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "datasets" / "demo_prompts.jsonl"
PARTS = ("generate", "score", "train", "step", "wall", "cpu")
# The sizes are replaced by the command line's (the defaults are these).
SETTINGS = {
    "model": "tiny-llama",
    "prompts": 8,
    "generations": 8,
    "max_new_tokens": 24,
    "learning_rate": 1e-6,
    "seed": 42,
    "gradient_checkpointing": False,
    "micro_batch_size": None,
}


def align_side(steps: int, work: Path) -> dict:
    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe
    from align.runner import run_recipe

    recipe = work / "grpo.yaml"
    micro = "null" if SETTINGS["micro_batch_size"] is None else SETTINGS["micro_batch_size"]
    recipe.write_text(
        f"model: {recipe_model(SETTINGS['model'])}\nstages:\n  grpo:\n    data: demo_prompts\n"
        "    reward_functions: [sentiment]\n"
        f"    steps: {steps}\n    batch_size: {SETTINGS['prompts']}\n    num_generations: {SETTINGS['generations']}\n"
        f"    mini_batch_size: null\n    micro_batch_size: {micro}\n    forward_batch_size: {micro}\n"
        "    ppo_epochs: 1\n"
        f"    max_new_tokens: {SETTINGS['max_new_tokens']}\n    temperature: 1.0\n    beta: 0.0\n    kl_coef: 0.0\n"
        f"    learning_rate: {SETTINGS['learning_rate']}\n    logging_steps: 1\n    save_steps: 0\n"
        f"    seed: {SETTINGS['seed']}\n"
        f"    gradient_checkpointing: {str(SETTINGS['gradient_checkpointing']).lower()}\n"
    )
    # CPU seconds of each step (the process's, comparable with TRL's on a shared machine): from the start of
    # the rollout to the end of the update, by wrapping the loop's methods from the outside.
    from align.rl.loop import OnlineRL

    cpu: list[float] = []
    rollout, optimise = OnlineRL._rollout, OnlineRL._optimise

    def timed_rollout(self, prompts):  # noqa: ANN001, ANN202
        cpu.append(time.process_time())
        return rollout(self, prompts)

    def timed_optimise(self, batch):  # noqa: ANN001, ANN202
        try:
            return optimise(self, batch)
        finally:
            cpu[-1] = time.process_time() - cpu[-1]

    OnlineRL._rollout, OnlineRL._optimise = timed_rollout, timed_optimise
    pm = get_plugin_manager()
    started = time.perf_counter()
    summary = run_recipe(load_recipe(recipe, [], pm), pm, run_dir=work / "run")
    total = time.perf_counter() - started
    assert summary.status == "done", summary.error
    log = [json.loads(line) for line in (work / "run" / "logs" / "grpo.metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in log if r["step"] is not None]
    times = [r["time"] for r in per_step]
    return {
        "step": [r["step_seconds"] for r in per_step],
        "cpu": cpu,
        "wall": [b - a for a, b in itertools.pairwise(times)],  # interval ending at step 2, 3, …
        "generate": [r["rollout_seconds"] for r in per_step],
        "score": [r["scoring_seconds"] for r in per_step],
        "train": [r["train_seconds"] for r in per_step],
        "length": [r["response_length"] for r in per_step],
        "completions": [SETTINGS["prompts"] * SETTINGS["generations"]] * len(per_step),
        "total": total,
    }


def trl_side(steps: int, work: Path, model_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))
    from plugins.reward_functions import sentiment

    lengths: list[float] = []
    counts: list[int] = []

    def sentiment_reward(prompts, completions, completion_ids, **kwargs):  # noqa: ANN001, ANN003
        # Conversational data: each completion is [{"role": "assistant", "content": …}].
        lengths.append(statistics.fmean(len(ids) for ids in completion_ids))
        counts.append(len(completions))
        return [sentiment(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step: list[float] = []
            self.cpu: list[float] = []
            self.cpu_begin = 0.0
            self.wall: list[float] = []
            self.begin = self.end = None

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.begin = time.perf_counter()
            self.cpu_begin = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            now = time.perf_counter()
            self.step.append(now - self.begin)
            self.cpu.append(time.process_time() - self.cpu_begin)
            if self.end is not None:
                self.wall.append(now - self.end)
            self.end = now

    torch.manual_seed(SETTINGS["seed"])
    rows = [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": rows})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    responses = SETTINGS["prompts"] * SETTINGS["generations"]
    micro = SETTINGS["micro_batch_size"] or responses
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=responses // micro,  # steps_per_generation follows: 64 per generation
        gradient_checkpointing=SETTINGS["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if SETTINGS["gradient_checkpointing"] else None,
        num_generations=SETTINGS["generations"],
        num_iterations=1,
        max_completion_length=SETTINGS["max_new_tokens"],
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        use_vllm=False,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="linear",
        adam_epsilon=1e-5,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=SETTINGS["seed"],
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=sentiment_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    parts: dict[str, list[float]] = {"generate": [], "generate_and_score": []}

    def timed(name: str, function):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[name].append(time.perf_counter() - started)

        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    assert trainer.state.global_step == steps, trainer.state.global_step
    score = [b - a for a, b in zip(parts["generate"], parts["generate_and_score"], strict=True)]
    return {
        "step": timer.step,
        "cpu": timer.cpu,
        "wall": timer.wall,
        "generate": parts["generate"],
        "score": score,
        "train": [s - g for s, g in zip(timer.step, parts["generate_and_score"], strict=True)],
        "length": lengths,
        "completions": counts,
        "total": total,
    }


def child(side: str, steps: int, model_dir: str, threads: int) -> None:
    import datasets
    import torch
    import transformers  # noqa: F401 - imported before the clock starts, on both sides
    import trl  # noqa: F401

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix=f"bench-grpo-{side}-"))
    result = align_side(steps, work) if side == "align" else trl_side(steps, work, model_dir)
    result["threads"] = torch.get_num_threads()
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def check_prompts(model_dir: str) -> int:
    """The first prompt's token ids, rendered by align and by the chat template as TRL renders it: equal?"""
    from transformers import AutoTokenizer

    from align.render import Renderer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = json.loads(PROMPTS.read_text().splitlines()[0])["messages"]
    ours = Renderer(tokenizer, 1024).prompt_ids(messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == theirs, (ours, theirs)
    return len(ours)


def mean_after_first(values: list[float]) -> float:
    return statistics.fmean(values[1:]) if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of both sides")
    add_model_argument(parser)
    parser.add_argument("--prompts", type=int, default=SETTINGS["prompts"], help="per step (default: %(default)s)")
    parser.add_argument("--generations", type=int, default=SETTINGS["generations"], help="(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=SETTINGS["max_new_tokens"], help="(default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--micro-batch-size", type=int, help="completions per forward/backward pass, both sides")
    parser.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    SETTINGS.update(
        model=args.model,
        prompts=args.prompts,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        gradient_checkpointing=args.gradient_checkpointing,
        micro_batch_size=args.micro_batch_size,
    )
    if args.micro_batch_size and (args.prompts * args.generations) % args.micro_batch_size:
        parser.error("--micro-batch-size must divide the completions per step (--prompts × --generations)")
    if args.child:
        child(args.child, args.steps, args.model_dir, args.threads)
        return

    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    model_dir = model_folder(args.model)
    prompt_tokens = check_prompts(model_dir)
    options = [
        "--model",
        args.model,
        "--prompts",
        str(args.prompts),
        "--generations",
        str(args.generations),
        "--max-new-tokens",
        str(args.max_new_tokens),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        *(["--micro-batch-size", str(args.micro_batch_size)] if args.micro_batch_size else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {"align": [], "trl": []}
    load_before = os.getloadavg()
    for _ in range(args.repeat):
        for side in ("align", "trl"):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    side,
                    "--steps",
                    str(args.steps),
                    "--model-dir",
                    model_dir,
                    "--threads",
                    str(args.threads),
                    *options,
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=env,
            )
            if done.returncode != 0:
                sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.rpartition("RESULT ")[2].splitlines()[0]))

    responses = SETTINGS["prompts"] * SETTINGS["generations"]
    threads = {r["threads"] for side_runs in runs.values() for r in side_runs}
    assert threads == {args.threads}, f"torch threads in the children: {threads}"
    micro = f"micro-batches of {args.micro_batch_size}" if args.micro_batch_size else "the whole batch at once"
    print(
        f"GRPO, {args.model}, {args.steps} steps of {SETTINGS['prompts']} prompts × {SETTINGS['generations']} = "
        f"{responses} completions (≤ {SETTINGS['max_new_tokens']} new tokens), one update of all {responses} per "
        f"step ({micro}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}), CPU, fp32, "
        f"{args.threads} thread(s); prompt renderings equal (first prompt: {prompt_tokens} tokens); "
        f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print("mean seconds per step, steps 2.. of each run (step 1 is warm-up)")
    header = (
        f"  {'side':6s} {'generate':>9s} {'score':>8s} {'train':>8s} {'step':>8s} {'wall':>8s} {'cpu':>8s}   "
        "mean length, completions/step, peak RSS"
    )
    print(header)
    medians: dict[str, dict[str, float]] = {}
    bests: dict[str, dict[str, float]] = {}
    for side, side_runs in runs.items():
        per_run = [
            {k: mean_after_first(r[k]) if k != "wall" else statistics.fmean(r["wall"]) for k in PARTS}
            for r in side_runs
        ]
        for index, (r, m) in enumerate(zip(side_runs, per_run, strict=True)):
            print(
                f"  {side:6s} {m['generate']:9.3f} {m['score']:8.3f} {m['train']:8.3f} {m['step']:8.3f} "
                f"{m['wall']:8.3f} {m['cpu']:8.3f}   {statistics.fmean(r['length']):5.1f}, "
                f"{sorted(set(r['completions']))}, {r['peak_mb']:.0f} MB "
                f"(run {index + 1}; steps: " + ", ".join(f"{s:.3f}" for s in r["step"]) + ")"
            )
        medians[side] = {k: statistics.median(m[k] for m in per_run) for k in PARTS}
        bests[side] = min(per_run, key=lambda m: m["step"])  # interference only ever adds time
    for name, figures in (("medians over runs", medians), ("fastest run of each side", bests)):
        a, t = figures["align"], figures["trl"]
        print(
            f"  align / TRL, {name}: step {a['step']:.3f} / {t['step']:.3f} s = {a['step'] / t['step']:.2f}x; "
            + ", ".join(f"{k} {a[k] / t[k]:.2f}x" for k in PARTS if k != "step")
        )
    print("  (goal: step ≤ 0.8x)")


if __name__ == "__main__":
    main()
