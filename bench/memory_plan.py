"""The memory plan's estimate of each stage against the stage's measured peak.

    OMP_NUM_THREADS=1 python bench/memory_plan.py [--model tiny-llama smollm2] [--stages sft dpo grpo]
        [--variants base checkpointing micro] [--max-length N] [--batch-size N] [--responses N]
        [--prompt-length N] [--new-tokens N] [--steps 2] [--threads 1] [--json FILE] [--keep]

For each stage type (sft, rm, dpo, kto, ppo, grpo) and each model, a one-stage recipe is planned with
``align.memory.plan_recipe`` (what ``align plan`` prints: the stage's ``on_device`` total and its parts)
and then run with ``align run --no-memory-check`` in a fresh process, with a small plugin (this file's
probe, loaded through ``--plugins-dir``) that measures the stage. Variants: ``base`` (every stage),
``checkpointing`` (``gradient_checkpointing: true``: the TRL stages and grpo) and ``micro``
(``micro_batch_size`` and ``forward_batch_size`` a quarter of the responses: grpo and ppo), the two
settings the plan says lower the peak.

The data fill the lengths the plan assumes. The plan counts batches padded to the stage's limits
(``max_length``; ``max_prompt_length + max_new_tokens`` in online RL), while a real batch is padded to its
longest row only, so the benchmark writes synthetic datasets, with the model's own tokenizer and chat
template, whose rendered rows are just under the limit (align drops longer rows rather than cut them):
alpaca conversations (sft), alpaca pairs with ``chosen``/``rejected`` (rm, dpo), alpaca rows with a
``kto_tag`` column through a ``dataset_info.json`` (kto), and prompts just under ``max_prompt_length``
that ask the model to go on writing (ppo, grpo, rewarded by the ``format`` function). The random
tiny-llama seldom ends a reply early (405 of 512 tokens on average); SmolLM2 runs to ``max_new_tokens``
on these prompts. The mean response length each run logged is printed: below ``max_new_tokens`` the
plan's length is not reached.

Both models together take about 25 minutes on a busy 2-core CPU (``bench/RESULTS.md``); the sizes scale
with ``--max-length``, ``--batch-size``, ``--responses``, ``--prompt-length``, ``--new-tokens`` and
``--steps``. The models come from align's cache (``$ALIGN_HOME``), built or converted there once.

What is measured (the probe, inside the ``align run`` process):

* When the stage starts (``align_stage_starting``), the probe first imports what the stages import
  (torch, transformers, TRL, datasets, accelerate, align's stage modules) and collects garbage; then the
  baseline is taken. With CUDA: ``torch.cuda.memory_allocated()``; on a CPU: the process's resident set
  (``VmRSS`` of ``/proc/self/status``). The stage then loads its models, prepares its data, trains and
  saves. **Measured = the peak during the stage − the baseline**: with CUDA
  ``torch.cuda.max_memory_allocated()``; on a CPU the kernel's high-water mark of the resident set
  (``VmHWM``), reset at every phase boundary (``/proc/self/clear_refs``), so each phase's peak is exact
  and the stage's is the largest of them.
* Phases, for the breakdown: ``setup`` (data, models, trainer), each TRL ``step N`` (forward, backward,
  optimizer step; a ``TrainerCallback`` added through ``align_trainer_built``), and in online RL each
  ``generate N``, ``score N`` and ``train N`` (``OnlineRL`` methods wrapped from outside; align is not
  changed), and ``after`` each step (the last one includes saving the output). ``at start`` is what the
  process held, over the baseline, when training began (data, trainer, the weights copied at loading:
  weights that transformers maps from a safetensors file become resident only when first used).

Limits of the CPU measurement. The resident set is not tensors: it also counts Python objects,
tokenizers, the datasets' Arrow buffers, the pages of shared libraries first touched during the stage
(the first backward pass pulls in kernels), and the allocator's pages. glibc would keep freed memory in
its heaps and reuse it, so the child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation from
64 KiB is its own mapping, returned when freed, and the resident set follows live memory (at some cost
in system time; ``--no-mmap-threshold`` turns it off). Weights read from a safetensors file may stay
file-backed pages (``RssFile``) rather than anonymous memory: both count. The plan, by contrast, counts
only the tensors it names. On a GPU the ``torch.cuda`` figures count tensors only (not the CUDA context,
nor the caching allocator's reserve), which is what the plan estimates; this task had no GPU, so that
path is written but was not run here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from align import hookimpl

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "rm", "dpo", "kto", "ppo", "grpo")
TRL_STAGES = ("sft", "rm", "dpo", "kto")
VARIANTS = ("base", "checkpointing", "micro")
PROBE_ENV = "ALIGN_BENCH_MEMORY_OUT"
MiB = 1 << 20

#: Sizes per model: TRL stages' max_length and batch_size, online RL's responses per step and lengths.
#: tiny-llama (2 layers, width 128, vocabulary 1024, 0.46M parameters: activations dominate; its
#: max_position_embeddings is 1024), SmolLM2-135M (30 layers, width 576, vocabulary 49152: weights,
#: gradients and Adam states, 2.1 GB, dominate; all 13 runs take ~16 minutes on a busy 2-core CPU).
DEFAULTS = {
    "tiny-llama": {"max_length": 1024, "batch_size": 8, "responses": 16},
    "smollm2": {"max_length": 256, "batch_size": 2, "responses": 4},
}


# ======================================================================= the probe (inside `align run`)


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class Meter:
    """Memory over a stage's baseline, phase by phase: CUDA allocator statistics, else the resident set."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.phases: list[dict[str, Any]] = []
        self.label = "setup"
        self.steps = 0
        self.loaded: float | None = None
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()

    # CUDA: tensors allocated; CPU: resident set.
    def _now(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return int(self.torch.cuda.memory_allocated())
        return _proc_status()["VmRSS"]

    def _peak_and_reset(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            peak = int(self.torch.cuda.max_memory_allocated())
            self.torch.cuda.reset_peak_memory_stats()
            return peak
        peak = _proc_status()["VmHWM"]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return peak

    def start(self) -> None:
        gc.collect()
        self._peak_and_reset()
        self.baseline = self._now()
        self.phase_start = 0
        if not self.cuda:  # what the resident set is made of near its peak (sampled every 5 ms)
            status = _proc_status()
            self.base_parts = {"anon": status["RssAnon"], "file": status["RssFile"]}
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()

    def _sample(self) -> None:
        highest = 0
        while not self._stop.wait(0.005):
            status = _proc_status()
            if status["VmRSS"] > highest:
                highest = status["VmRSS"]
                self.at_peak = {
                    "rss": highest - self.baseline,
                    "anon": status["RssAnon"] - self.base_parts["anon"],
                    "file": status["RssFile"] - self.base_parts["file"],
                }

    def mark(self, label: str) -> None:
        """End the current phase (recording its peak over the baseline) and begin ``label``."""
        peak = self._peak_and_reset() - self.baseline
        now = self._now() - self.baseline
        self.phases.append({"phase": self.label, "start": self.phase_start, "peak": peak, "end": now})
        self.label, self.phase_start = label, now

    def finish(self) -> dict[str, Any]:
        self.mark("")
        self._stop.set()
        top = max(self.phases, key=lambda p: p["peak"])
        return {
            "cuda": self.cuda,
            "baseline": self.baseline,
            "peak": top["peak"],
            "peak_phase": top["phase"],
            "loaded": self.loaded,
            "phases": self.phases,
            "at_peak": self.at_peak,
            "threads": self.torch.get_num_threads(),
        }


_meter: Meter | None = None


def _import_what_stages_import() -> None:
    import importlib

    for module in (
        "torch",
        "transformers",
        "datasets",
        "accelerate",
        "trl",
        "torch.utils.tensorboard",
        "transformers.models.llama.modeling_llama",
        "align.training",
        "align.prepare",
        "align.rl.loop",
        "align.rl.forward",
        "align.rl.batch",
        "peft",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    try:
        from align.training import trl_class

        for name in ("SFTTrainer", "RewardTrainer", "DPOTrainer", "KTOTrainer"):
            trl_class(name)
    except Exception:  # noqa: BLE001 - an import that fails here fails in the stage too, with its message
        pass


def _wrap_online_rl(meter: Meter) -> None:
    """Phase marks around the online-RL loop's generation, scoring and update (from outside)."""
    from align.rl.loop import OnlineRL

    setup_engine, optimise = OnlineRL._setup_engine, OnlineRL._optimise

    def marked_setup_engine(self: Any) -> None:
        setup_engine(self)
        generate = self.session.generate

        def marked_generate(prompts: Any, sampling: Any) -> Any:
            if meter.loaded is None:
                meter.loaded = meter._now() - meter.baseline
            meter.steps += 1
            meter.mark(f"generate {meter.steps}")
            try:
                return generate(prompts, sampling)
            finally:
                meter.mark(f"score {meter.steps}")

        self.session.generate = marked_generate

    def marked_optimise(self: Any, batch: Any) -> Any:
        meter.mark(f"train {meter.steps}")
        try:
            return optimise(self, batch)
        finally:
            meter.mark("after")

    OnlineRL._setup_engine = marked_setup_engine  # type: ignore[method-assign]
    OnlineRL._optimise = marked_optimise  # type: ignore[method-assign]


@hookimpl
def align_stage_starting(context: Any) -> None:
    global _meter
    if not os.environ.get(PROBE_ENV):
        return
    _import_what_stages_import()
    _meter = Meter()
    _wrap_online_rl(_meter)
    _meter.start()


@hookimpl
def align_trainer_built(context: Any, trainer: Any) -> None:
    if _meter is None:
        return
    from transformers import TrainerCallback

    meter = _meter

    class Phases(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.loaded = meter._now() - meter.baseline
            meter.mark("begin")

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.mark(f"step {state.global_step + 1}")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.mark("after")

    trainer.add_callback(Phases())


@hookimpl
def align_stage_finished(context: Any, outcome: Any) -> None:
    global _meter
    if _meter is None:
        return
    result = _meter.finish()
    result.update(status=outcome.status, error=outcome.error)
    Path(os.environ[PROBE_ENV]).write_text(json.dumps(result))
    _meter = None


# ======================================================================= synthetic data

WORDS = (
    "the river morning garden quiet window stone bright story table letter winter harbour mountain "
    "lantern village bridge candle market forest silver meadow orchard kitchen station evening "
    "painter teacher sailor doctor farmer traveller friend stranger music colour weather journey "
    "slowly gently always never again often because although while before after until under over "
    "walked opened carried watched listened remembered painted wrote followed waited laughed "
    "green golden small large old young warm cold early late simple careful happy tired"
).split()


class Sizer:
    """Builds texts whose rendered token count is as close as possible under a limit."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        from align.render import Renderer

        self.renderer = Renderer(tokenizer, 1 << 30)
        self.tokenizer = tokenizer
        self.random = random.Random(seed)

    def words(self, count: int) -> list[str]:
        return self.random.choices(WORDS, k=count)

    def tokens(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> int:
        text = self.renderer.text(messages, generation_prompt=generation_prompt)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit(self, build: Any, limit: int) -> Any:
        """``build(n)`` for the largest word count n whose ``build(n)[1]`` (tokens) is at most ``limit``."""
        low, high = 0, 1
        while build(high)[1] <= limit:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if build(middle)[1] <= limit else (low, middle)
        return build(low)


def write_data(folder: Path, tokenizer: Any, rows: int, max_length: int, prompt_length: int) -> dict[str, Any]:
    """The four datasets, rendered just under their limits, in ``folder``; returns each one's (min, max) tokens."""
    sizer = Sizer(tokenizer, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    question = max_length // 4  # the prompt's share of a conversation

    def user_text(pool: list[str]) -> tuple[str, int]:
        def build(n: int) -> tuple[str, int]:
            text = "Go on with this text: " + " ".join(pool[:n])
            return text, sizer.tokens([{"role": "user", "content": text}], generation_prompt=True)

        return sizer.fit(build, question)

    def reply(prompt: str, pool: list[str]) -> tuple[str, int]:
        def build(n: int) -> tuple[str, int]:
            text = " ".join(pool[:n]).capitalize() + "."
            return text, sizer.tokens([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}])

        return sizer.fit(build, max_length - 2)  # the template's newline after the end of turn is not trained

    sft, pairs, feedback, lengths = [], [], [], {"sft": [], "pairs": [], "kto": [], "prompts": []}
    for index in range(rows):
        prompt, _ = user_text(sizer.words(max_length))
        answer, tokens = reply(prompt, sizer.words(2 * max_length))
        sft.append({"instruction": prompt, "input": "", "output": answer})
        lengths["sft"].append(tokens)
        chosen, chosen_tokens = reply(prompt, sizer.words(2 * max_length))
        rejected, rejected_tokens = reply(prompt, sizer.words(2 * max_length))
        pairs.append({"instruction": prompt, "input": "", "chosen": chosen, "rejected": rejected})
        lengths["pairs"] += [chosen_tokens, rejected_tokens]
        feedback.append({"instruction": prompt, "input": "", "output": chosen, "kto_tag": index % 2 == 0})
        lengths["kto"].append(chosen_tokens)
    ask = "\n\nContinue the story above in the same style. Write at least 600 more words; do not stop early."
    prompts = []
    for _ in range(rows):
        pool = sizer.words(prompt_length)

        def build(n: int, pool: list[str] = pool) -> tuple[str, int]:
            text = " ".join(pool[:n]).capitalize() + "." + ask
            return text, sizer.tokens([{"role": "user", "content": text}], generation_prompt=True)

        text, tokens = sizer.fit(build, prompt_length)
        prompts.append({"messages": [{"role": "user", "content": text}]})
        lengths["prompts"].append(tokens)
    (folder / "sft.json").write_text(json.dumps(sft))
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "kto.json").write_text(json.dumps(feedback))
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    columns = {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}
    registry = {"bench_kto": {"file_name": "kto.json", "formatting": "alpaca", "columns": columns}}
    (folder / "dataset_info.json").write_text(json.dumps(registry))
    return {name: (min(values), max(values)) for name, values in lengths.items()}


# ======================================================================= recipes, plan, runs


def stage_settings(stage: str, variant: str, sizes: dict[str, int], steps: int, data: Path) -> dict[str, Any]:
    if stage in TRL_STAGES:
        settings: dict[str, Any] = {
            "data": {"sft": str(data / "sft.json"), "kto": "bench_kto"}.get(stage, str(data / "pairs.json")),
            "max_length": sizes["max_length"],
            "batch_size": sizes["batch_size"],
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 0,
        }
        if stage == "rm":
            settings["eval_size"] = 0
    else:
        responses = sizes["responses"]
        generations = 1 if stage == "ppo" else max(2, min(4, responses))  # grpo compares 2 or more
        settings = {
            "data": str(data / "prompts.jsonl"),
            "reward_functions": ["format"],
            "steps": steps,
            "batch_size": max(1, responses // generations),
            "num_generations": generations,
            "mini_batch_size": None,  # one update over all the responses
            "ppo_epochs": 1,
            "max_prompt_length": sizes["prompt_length"],
            "max_new_tokens": sizes["new_tokens"],
            "temperature": 1.0,
            "logging_steps": 1,
            "save_steps": 0,
        }
        if variant == "micro":
            settings["micro_batch_size"] = settings["forward_batch_size"] = max(1, responses // 4)
    if variant == "checkpointing":
        settings["gradient_checkpointing"] = True
    return settings


def applies(stage: str, variant: str) -> bool:
    return (
        variant == "base"
        or (variant == "checkpointing" and stage in (*TRL_STAGES, "grpo"))
        or (variant == "micro" and stage in ("ppo", "grpo"))
    )


def write_recipe(path: Path, model: str, stage: str, settings: dict[str, Any], data: Path) -> None:
    import yaml

    recipe = {"model": model, "dataset_dir": str(data), "stages": {stage: settings}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def plan_of(recipe: Path) -> dict[str, Any]:
    """The stage's plan: its total on the device and its parts, grouped."""
    from align.memory import plan_recipe
    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe

    pm = get_plugin_manager()
    _, plans = plan_recipe(load_recipe(recipe, [], pm), pm)
    (plan,) = plans
    parts = {"weights": 0, "optimizer": 0, "activations": 0, "logits": 0, "kv": 0, "other": 0}
    for need in plan.needs or []:
        if need.where != "device":
            continue
        what = need.what
        group = (
            "optimizer"
            if "gradients" in what or "Adam" in what
            else "weights"
            if "weights" in what
            else "activations"
            if what.startswith("activations")
            else "logits"
            if "logits" in what
            else "kv"
            if what.startswith("KV cache")
            else "other"
        )
        parts[group] += need.bytes
    return {"total": plan.on_device, "parts": parts, "needs": [(n.what, n.bytes, n.where) for n in plan.needs or []]}


def run_stage(recipe: Path, stage: str, work: Path, probe_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    out = work / "probe.json"
    run_dir = work / "run"
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "align.cli",
            "run",
            str(recipe),
            "--run-dir",
            str(run_dir),
            "--no-memory-check",
            "--plugins-dir",
            str(probe_dir),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, PROBE_ENV: str(out)},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not out.is_file():
        return {"failed": (done.stdout + done.stderr)[-2500:], "seconds": seconds}
    result = json.loads(out.read_text())
    result["seconds"] = seconds
    metrics_file = run_dir / "logs" / f"{stage}.metrics.jsonl"
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        lengths = [r["response_length"] for r in records if r.get("response_length") is not None]
        if lengths:
            result["response_length"] = statistics.fmean(lengths)
        result["step_seconds"] = step_seconds(records)
    return result


def step_seconds(records: list[dict[str, Any]]) -> float | None:
    """Seconds per optimizer step after the first (warm-up): online RL's ``step_seconds``, or for a TRL
    trainer the time between its first and last logged losses (``logging_steps: 1``) over the steps between."""
    rl = [r["step_seconds"] for r in records if r.get("step_seconds") is not None]
    if rl:
        return statistics.fmean(rl[1:] or rl)
    logged = sorted({r["step"]: r["time"] for r in records if "loss" in r and "time" in r}.items())
    if len(logged) < 2:
        return None
    (first_step, first_time), (last_step, last_time) = logged[0], logged[-1]
    return (last_time - first_time) / (last_step - first_step)


# ======================================================================= the report


def mib(count: float | None) -> str:
    return "-" if count is None else f"{count / MiB:,.0f}"


def report(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':<10} {'stage':<5} {'variant':<13} {'weights':>8} {'grad+Adam':>9} {'activ.':>7} {'logits':>7} "
        f"{'KV':>5} {'estimate':>9} {'measured':>9} {'ratio':>6}  {'at start':>8} {'peak in':<9} {'resp.':>6} {'s':>5} "
        f"{'s/step':>7}"
    )
    print("\nMiB; estimate = the plan's on_device total; measured = peak - baseline; ratio = estimate / measured")
    print(header)
    print("-" * len(header))
    for r in results:
        plan, measured = r["plan"], r["measured"]
        p = plan["parts"]
        line = (
            f"{r['model']:<10} {r['stage']:<5} {r['variant']:<13} {mib(p['weights']):>8} {mib(p['optimizer']):>9} "
            f"{mib(p['activations']):>7} {mib(p['logits']):>7} {mib(p['kv']):>5} {mib(plan['total']):>9} "
        )
        if "failed" in measured:
            print(line + "  FAILED: " + measured["failed"].strip().splitlines()[-1][:100])
            continue
        ratio = plan["total"] / measured["peak"]
        verdict = "" if abs(ratio - 1) <= 0.25 else " *"
        length = measured.get("response_length")
        print(
            line
            + f"{mib(measured['peak']):>9} {ratio:>6.2f}{verdict:<2}{mib(measured['loaded']):>8} "
            + f"{measured['peak_phase']:<9} {'-' if length is None else f'{length:.0f}':>6} {measured['seconds']:>5.0f}"
            + ("       -" if measured.get("step_seconds") is None else f" {measured['step_seconds']:>7.2f}")
        )
    print("* outside ±25 %.  at start: held when training began, over the baseline")
    print("\nphases (MiB over the baseline: at the start → peak), and at the peak (sampled) anonymous / file pages:")
    for r in results:
        measured = r["measured"]
        if "failed" in measured:
            continue
        phases = ", ".join(f"{p['phase']} {mib(p['start'])}→{mib(p['peak'])}" for p in measured["phases"])
        at_peak = measured.get("at_peak") or {}
        parts = f"anon {mib(at_peak.get('anon'))}, file {mib(at_peak.get('file'))}" if at_peak else ""
        print(f"  {r['model']} {r['stage']} {r['variant']}: {phases}; {parts}")


# ======================================================================= main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny-llama"], choices=sorted(DEFAULTS))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-length", type=int, help="TRL stages' max_length (default per model)")
    parser.add_argument("--batch-size", type=int, help="TRL stages' batch_size (default per model)")
    parser.add_argument("--responses", type=int, help="online RL: responses per step (default per model)")
    parser.add_argument("--prompt-length", type=int, help="online RL: max_prompt_length (default max_length / 2)")
    parser.add_argument("--new-tokens", type=int, help="online RL: max_new_tokens (default max_length / 2)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (2: Adam's state exists)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--no-mmap-threshold", action="store_true", help="leave glibc's malloc as it is")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (under the temp folder)")
    args = parser.parse_args()

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-plan-"))
    probe_dir = work / "plugins"
    probe_dir.mkdir()
    (probe_dir / "memory_probe.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from memory_plan import align_stage_finished, align_stage_starting, align_trainer_built  # noqa: F401\n"
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not args.no_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    print(
        f"memory plan against measured peak: {args.threads} torch thread(s), "
        f"MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, load average "
        f"{os.getloadavg()[0]:.1f}, work folder {work}"
    )
    results = []
    try:
        for model in args.model:
            results += run_model(model, args, work, probe_dir, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(results)
    print(f"\n{len(results)} runs in {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def run_model(model: str, args: Any, work: Path, probe_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from align.plugin_manager import get_plugin_manager
    from align.runner import align_home
    from align.schema import build

    defaults = DEFAULTS[model]
    max_length = args.max_length or defaults["max_length"]
    sizes = {
        "max_length": max_length,
        "batch_size": args.batch_size or defaults["batch_size"],
        "responses": args.responses or defaults["responses"],
        "prompt_length": args.prompt_length or max_length // 2,
        "new_tokens": args.new_tokens or max_length // 2,
    }
    source = get_plugin_manager().get("model source", model)
    model_dir = source.materialize(build(source.Config, {}, "model"), align_home() / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = work / model / "data"
    rows = max(sizes["batch_size"], sizes["responses"]) * args.steps
    lengths = write_data(data, tokenizer, rows, max_length, sizes["prompt_length"])
    print(
        f"\n{model}: {sizes}; rendered tokens (min, max): "
        + ", ".join(f"{name} {low}-{high}" for name, (low, high) in lengths.items())
    )
    results = []
    for stage in args.stages:
        for variant in args.variants:
            if not applies(stage, variant):
                continue
            folder = work / model / f"{stage}-{variant}"
            folder.mkdir(parents=True)
            recipe = folder / "recipe.yaml"
            write_recipe(recipe, model, stage, stage_settings(stage, variant, sizes, args.steps, data), data)
            plan = plan_of(recipe)
            measured = run_stage(recipe, stage, folder, probe_dir, env)
            result = {"model": model, "stage": stage, "variant": variant, "sizes": sizes, "plan": plan}
            result["measured"] = measured
            results.append(result)
            peak = measured.get("peak")
            print(
                f"  {stage} {variant}: estimate {mib(plan['total'])} MiB, measured "
                + (f"{mib(peak)} MiB ({plan['total'] / peak:.2f})" if peak else "FAILED")
                + f", {measured['seconds']:.0f} s"
                + (f", {measured['step_seconds']:.2f} s/step" if measured.get("step_seconds") else ""),
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(folder / "run", ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
