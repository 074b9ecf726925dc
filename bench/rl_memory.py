"""Peak memory of a GRPO iteration at 16 and 64 responses, micro-batched against whole-batch.

    OMP_NUM_THREADS=1 python bench/rl_memory.py [--steps 2] [--micro 4] [--engine-batch 16]
        [--model MODEL] [--prompts 2,8] [--generations 8] [--max-new-tokens 128] [--gradient-checkpointing]

Four configurations, each in a fresh process running align's `grpo` stage through
`align.runner.run_recipe`: (16 responses = 2 prompts × 8, 64 responses = 8 prompts × 8) ×
(micro_batch_size = forward_batch_size = `--micro`, both unset = the whole batch at once). Everything
else is fixed: one optimizer step over all the iteration's responses (mini_batch_size unset,
ppo_epochs 1), beta 0 (no reference), the `sentiment` reward function, 128 new tokens at temperature 1,
prompts of about 64 tokens (`demo_prompts` with a fixed system message), and a tiny Llama from align's
`tiny-llama` source made larger so that activations dominate (4 layers, width 256, MLP 1024, vocabulary
1024: 4.5M parameters, 18 MB of weights, 54 MB with Adam's state). The rollout engine is `hf` with its
default batch_size (64: generation is not bounded by these settings); `--engine-batch N` adds the
micro-batched configurations again with the engine's batch_size set to N (`engine_options`).

`--model` replaces that model (`smollm2`, `tiny-llama` or a folder, as a recipe's `model:`: see
common.py); `--prompts SMALL,LARGE`, `--generations` and `--max-new-tokens` replace the sizes (a real
model's 49k-token vocabulary makes the whole-batch logits large: SmolLM2 at 64 × 128 new tokens would need
several GB). `--gradient-checkpointing` adds the micro-batched and whole-batch configurations again with
`gradient_checkpointing: true`.

What is measured, per phase of each iteration (generation, scoring = the no-grad log-prob forward and the
reward, training = forward, backward and optimizer step), is the growth of memory over what was in use
when the phase began, the largest over `--steps` iterations:

* with CUDA: torch.cuda.max_memory_allocated() after the phase minus memory_allocated() before it, the
  peak statistics reset at the phase's start;
* on CPU: the process's peak resident set (VmHWM, reset at the phase's start by writing 5 to
  /proc/self/clear_refs) minus its resident set (VmRSS) when the phase began. The children run with
  MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensors to the system at once: otherwise
  memory freed by one phase would be reused by the next without showing. The figures include whatever
  else the phase allocates (autograd buffers, the allocator's pages), so they are upper bounds on the
  tensors' needs, and equal for both settings except for what the settings change.

The `iteration` column is the highest memory in use at any phase's peak over what was in use before the
first iteration (model, optimizer state not yet allocated: Adam's state appears in the first training
phase).

The hooks wrap `OnlineRL._rollout`, `OnlineRL._optimise` and the engine session's `generate` from the
outside; align's code is not changed.
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
from typing import Any

from common import model_folder, recipe_model

REPO = Path(__file__).resolve().parents[1]
MODEL = {"source": "tiny-llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
SYSTEM = "You are a friendly assistant. Answer in one or two plain sentences and say whether you liked it."
GENERATIONS = 8
MAX_NEW_TOKENS = 128


class Meter:
    """Peak memory growth over a phase: CUDA allocator statistics, else the process's resident set."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.peaks: dict[str, list[float]] = {}
        self.highest = 0.0  # the highest memory in use seen at any phase's peak (absolute, MB)
        self.start = 0.0

    @staticmethod
    def _status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB → MB
        raise RuntimeError(field)

    def begin(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.start = self._status("VmRSS")

    def end(self, phase: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = self._status("VmHWM")
        self.peaks.setdefault(phase, []).append(peak - self.start)
        self.highest = max(self.highest, peak)

    def resident(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return self._status("VmRSS")


def install_hooks(meter: Meter, resident: dict[str, float]) -> None:
    from align.rl.loop import OnlineRL

    rollout, optimise, setup_engine = OnlineRL._rollout, OnlineRL._optimise, OnlineRL._setup_engine

    def hooked_setup_engine(self):  # noqa: ANN001, ANN202
        setup_engine(self)
        generate = self.session.generate

        def hooked_generate(prompts, sampling):  # noqa: ANN001, ANN202
            meter.begin()
            try:
                return generate(prompts, sampling)
            finally:
                meter.end("generate")
                meter.begin()  # the rest of _rollout: packing, log-prob forward, reward

        self.session.generate = hooked_generate

    def hooked_rollout(self, prompts):  # noqa: ANN001, ANN202
        resident.setdefault("before_first_step", meter.resident())
        out = rollout(self, prompts)
        meter.end("score")
        return out

    def hooked_optimise(self, batch):  # noqa: ANN001, ANN202
        meter.begin()
        out = optimise(self, batch)
        meter.end("train")
        return out

    OnlineRL._setup_engine, OnlineRL._rollout, OnlineRL._optimise = (
        hooked_setup_engine,
        hooked_rollout,
        hooked_optimise,
    )


def child(config: dict, steps: int, work: Path, data: Path) -> dict:
    import torch

    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe
    from align.runner import run_recipe

    meter = Meter()
    resident: dict[str, float] = {}
    install_hooks(meter, resident)
    micro, engine_batch = config["micro"], config["engine_batch"]
    chunk = "null" if micro is None else str(micro)
    recipe = work / "grpo.yaml"
    recipe.write_text(
        f"model: {recipe_model(config['model'])}\nstages:\n  grpo:\n    data: {data}\n"
        "    reward_functions: [sentiment]\n"
        f"    steps: {steps}\n    batch_size: {config['prompts']}\n    num_generations: {config['generations']}\n"
        f"    mini_batch_size: null\n    micro_batch_size: {chunk}\n    forward_batch_size: {chunk}\n"
        f"    ppo_epochs: 1\n    max_new_tokens: {config['max_new_tokens']}\n    max_prompt_length: 128\n"
        "    temperature: 1.0\n    beta: 0.0\n    logging_steps: 1\n    save_steps: 0\n"
        f"    gradient_checkpointing: {str(config['checkpointing']).lower()}\n"
        + (f"    engine_options: {{batch_size: {engine_batch}}}\n" if engine_batch else "")
    )
    pm = get_plugin_manager()
    started = time.perf_counter()
    summary = run_recipe(load_recipe(recipe, [], pm), pm, run_dir=work / "run")
    seconds = time.perf_counter() - started
    assert summary.status == "done", summary.error
    log = [json.loads(line) for line in (work / "run" / "logs" / "grpo.metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in log if r["step"] is not None]
    return {
        "peaks": {phase: max(values) for phase, values in meter.peaks.items()},
        "all": meter.peaks,
        "before_first_step": resident["before_first_step"],
        "highest": meter.highest,
        "cuda": meter.cuda,
        "threads": torch.get_num_threads(),
        "response_length": statistics.fmean(r["response_length"] for r in per_step),
        "train_seconds": statistics.fmean(r["train_seconds"] for r in per_step),
        "step_seconds": statistics.fmean(r["step_seconds"] for r in per_step),
        "seconds": seconds,
    }


def write_prompts(folder: Path, model: Any) -> tuple[Path, float]:
    """demo_prompts with a system message: prompts of about 64 tokens (their mean length is returned)."""
    from transformers import AutoTokenizer

    model_dir = model_folder(model)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = folder / "long_prompts.jsonl"
    lengths = []
    with path.open("w") as out:
        for line in (REPO / "datasets" / "demo_prompts.jsonl").read_text().splitlines():
            messages = [{"role": "system", "content": SYSTEM}, *json.loads(line)["messages"]]
            out.write(json.dumps({"messages": messages}) + "\n")
            lengths.append(
                len(
                    tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=True, return_dict=True
                    )["input_ids"]
                )
            )
    return path, statistics.fmean(lengths)


def iteration_peak(r: dict) -> float:
    """The highest memory in use during any iteration, over what was in use before the first one."""
    return r["highest"] - r["before_first_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4, help="micro_batch_size and forward_batch_size")
    parser.add_argument(
        "--engine-batch",
        type=int,
        help="also run the micro-batched configurations with the hf engine's batch_size set to this",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model",
        help="a model source (smollm2, tiny-llama), a local folder or a hub id, as a recipe's `model:` (default: "
        "tiny-llama with 4 layers × width 256, MLP 1024, vocabulary 1024)",
    )
    parser.add_argument("--prompts", default="2,8", help="prompts per step, small and large (default: %(default)s)")
    parser.add_argument("--generations", type=int, default=GENERATIONS, help="(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="(default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="add the configurations again with it on")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the configuration, as JSON
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        work = Path(tempfile.mkdtemp(prefix="bench-rl-memory-"))
        print("RESULT " + json.dumps(child(json.loads(args.child), args.steps, work, Path(args.data))))
        return

    model = args.model or MODEL
    small, large = (int(n) for n in args.prompts.split(","))
    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    work = Path(tempfile.mkdtemp(prefix="bench-rl-memory-"))
    data, prompt_tokens = write_prompts(work, model)  # also builds the model once, for every child
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    load_before = os.getloadavg()
    results: dict[tuple[int, str], dict] = {}
    # label → (micro_batch_size, the hf engine's batch_size, gradient checkpointing)
    configurations = {str(args.micro): (args.micro, None, False), "none": (None, None, False)}
    if args.engine_batch:
        configurations[f"{args.micro}, gen {args.engine_batch}"] = (args.micro, args.engine_batch, False)
    if args.gradient_checkpointing:
        configurations[f"{args.micro}, ckpt"] = (args.micro, None, True)
        configurations["none, ckpt"] = (None, None, True)
    for label, (micro, engine, checkpointing) in configurations.items():
        for prompts in (small, large):
            config = {
                "model": model,
                "prompts": prompts,
                "generations": args.generations,
                "max_new_tokens": args.max_new_tokens,
                "micro": micro,
                "engine_batch": engine,
                "checkpointing": checkpointing,
            }
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    json.dumps(config),
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                    "--data",
                    str(data),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=env,
            )
            if done.returncode != 0:
                sys.exit(f"batch {prompts * args.generations}, {label} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.rpartition("RESULT ")[2].splitlines()[0])
            results[(prompts * args.generations, label)] = result

    first = next(iter(results.values()))
    unit = "MB allocated (CUDA)" if first["cuda"] else "MB of peak RSS growth (CPU)"
    described = (
        f"tiny-llama {MODEL['num_layers']} layers × width {MODEL['hidden_size']} (MLP {MODEL['intermediate_size']})"
        if args.model is None
        else args.model
    )
    print(
        f"GRPO, {described}, prompts {prompt_tokens:.0f} tokens on average + {args.max_new_tokens} new, "
        f"one update of all responses per step, {args.steps} steps per configuration, {first['threads']} "
        f"thread(s); load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"peak memory per phase, {unit}, the largest over the steps")
    print(
        f"  {'responses':>9s} {'micro/forward':>13s} {'generate':>9s} {'score':>8s} {'train':>8s}   "
        f"{'iteration':>9s}   (in use before step 1; train growth per step; mean response length; train seconds; "
        "step seconds)"
    )
    for (batch, label), r in results.items():
        p = r["peaks"]
        print(
            f"  {batch:9d} {label:>13s} {p['generate']:9.0f} {p['score']:8.0f} {p['train']:8.0f}   "
            f"{iteration_peak(r):9.0f}       ({r['before_first_step']:.0f} MB; "
            + "/".join(f"{v:.0f}" for v in r["all"]["train"])
            + f" MB; {r['response_length']:.1f}; {r['train_seconds']:.1f} s; {r['step_seconds']:.1f} s)"
        )
    print(f"  ratio {large * args.generations} / {small * args.generations} responses:")
    for label in configurations:
        few, big = results[(small * args.generations, label)], results[(large * args.generations, label)]
        print(
            f"  {'':9s} {label:>13s} "
            + " ".join(f"{big['peaks'][p] / few['peaks'][p]:8.2f}x" for p in ("generate", "score", "train"))
            + f"   {iteration_peak(big) / iteration_peak(few):8.2f}x"
        )


if __name__ == "__main__":
    main()
