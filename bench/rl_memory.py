"""Peak memory of a GRPO iteration at 16 and 64 responses, micro-batched against whole-batch.

    OMP_NUM_THREADS=1 python bench/rl_memory.py [--steps 2] [--micro 4] [--engine-batch 16]

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


def child(prompts: int, micro: int | None, engine_batch: int | None, steps: int, work: Path, data: Path) -> dict:
    import torch

    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe
    from align.runner import run_recipe

    meter = Meter()
    resident: dict[str, float] = {}
    install_hooks(meter, resident)
    chunk = "null" if micro is None else str(micro)
    model = "{" + ", ".join(f"{k}: {v}" for k, v in MODEL.items()) + "}"
    recipe = work / "grpo.yaml"
    recipe.write_text(
        f"model: {model}\nstages:\n  grpo:\n    data: {data}\n    reward_functions: [sentiment]\n"
        f"    steps: {steps}\n    batch_size: {prompts}\n    num_generations: {GENERATIONS}\n"
        f"    mini_batch_size: null\n    micro_batch_size: {chunk}\n    forward_batch_size: {chunk}\n"
        f"    ppo_epochs: 1\n    max_new_tokens: {MAX_NEW_TOKENS}\n    max_prompt_length: 128\n"
        "    temperature: 1.0\n    beta: 0.0\n    logging_steps: 1\n    save_steps: 0\n"
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
        "seconds": seconds,
    }


def write_prompts(folder: Path) -> tuple[Path, float]:
    """demo_prompts with a system message: prompts of about 64 tokens (their mean length is returned)."""
    from align.plugin_manager import get_plugin_manager
    from align.runner import align_home
    from align.schema import build

    source = get_plugin_manager().get("model source", "tiny-llama")
    options = {k: v for k, v in MODEL.items() if k != "source"}
    model_dir = source.materialize(build(source.Config, options, "model"), align_home() / "models")
    from transformers import AutoTokenizer

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
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # prompts, micro ("none"), engine batch
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        prompts, micro, engine = (int(a) if a != "none" else None for a in args.child)
        work = Path(tempfile.mkdtemp(prefix="bench-rl-memory-"))
        print("RESULT " + json.dumps(child(prompts, micro, engine, args.steps, work, Path(args.data))))
        return

    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    work = Path(tempfile.mkdtemp(prefix="bench-rl-memory-"))
    data, prompt_tokens = write_prompts(work)  # also builds the model once, for every child
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    load_before = os.getloadavg()
    results: dict[tuple[int, str], dict] = {}
    configurations = {str(args.micro): (str(args.micro), "none"), "none": ("none", "none")}
    if args.engine_batch:
        configurations[f"{args.micro}, gen {args.engine_batch}"] = (str(args.micro), str(args.engine_batch))
    for label, (micro, engine) in configurations.items():
        for prompts in (2, 8):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(prompts),
                    micro,
                    engine,
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
                sys.exit(f"batch {prompts * GENERATIONS}, {label} failed:\n{done.stderr[-3000:]}")
            results[(prompts * GENERATIONS, label)] = json.loads(done.stdout.rpartition("RESULT ")[2].splitlines()[0])

    first = next(iter(results.values()))
    unit = "MB allocated (CUDA)" if first["cuda"] else "MB of peak RSS growth (CPU)"
    print(
        f"GRPO, tiny-llama {MODEL['num_layers']} layers × width {MODEL['hidden_size']} (MLP "
        f"{MODEL['intermediate_size']}), prompts {prompt_tokens:.0f} tokens on average + {MAX_NEW_TOKENS} new, "
        f"one update of all responses per step, {args.steps} steps per configuration, {first['threads']} "
        f"thread(s); load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"peak memory per phase, {unit}, the largest over the steps")
    print(
        f"  {'responses':>9s} {'micro/forward':>13s} {'generate':>9s} {'score':>8s} {'train':>8s}   "
        f"{'iteration':>9s}   (in use before step 1; train growth per step; mean response length; train seconds)"
    )
    for (batch, label), r in results.items():
        p = r["peaks"]
        print(
            f"  {batch:9d} {label:>13s} {p['generate']:9.0f} {p['score']:8.0f} {p['train']:8.0f}   "
            f"{iteration_peak(r):9.0f}       ({r['before_first_step']:.0f} MB; "
            + "/".join(f"{v:.0f}" for v in r["all"]["train"])
            + f" MB; {r['response_length']:.1f}; {r['train_seconds']:.1f} s)"
        )
    print("  ratio 64 / 16 responses:")
    for label in configurations:
        small, big = results[(16, label)], results[(64, label)]
        print(
            f"  {'':9s} {label:>13s} "
            + " ".join(f"{big['peaks'][p] / small['peaks'][p]:8.2f}x" for p in ("generate", "score", "train"))
            + f"   {iteration_peak(big) / iteration_peak(small):8.2f}x"
        )


if __name__ == "__main__":
    main()
