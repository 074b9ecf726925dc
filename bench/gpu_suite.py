"""The GPU figures of issue 13 in one script: LoRA SFT throughput and MFU, a DPO step, PPO and GRPO steps
with the hf and vllm engines, and the memory plan against the measured peak.

    python bench/gpu_suite.py                 # on a GPU: a ~0.5B Llama in bf16
    python bench/gpu_suite.py --tiny          # anywhere: the same runs, scaled down, to check the script

Each part is an ``align run`` of a one-stage recipe in a fresh process, as a user runs it. The model is
align's ``tiny-llama`` source at ~0.5B parameters (random weights: no hub download is possible on the
lent machine, and throughput does not depend on what the weights know); ``--model`` takes any other.

* SFT: tokens/s from TRL's own ``num_tokens`` over ``train_runtime`` (the last logged record), and MFU:
  model FLOPs per token over the GPU's peak dense bf16 FLOPS. A LoRA step does the forward pass (2N FLOPs
  per token) and the backward pass through the activations (2N) but not the frozen weights' gradients,
  so 4N; full fine-tuning is 6N.
* DPO, PPO, GRPO: seconds per step (the median over the steps after the first), the RL ones from the
  loop's ``step_seconds`` with its rollout and scoring parts, for ``engine: hf`` and ``engine: vllm``.
* Memory: the plan's per-process estimate (``align.memory``) against ``torch.cuda.max_memory_allocated``,
  read by a plugin at the end of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_argument, recipe_model  # noqa: E402

#: ~0.5B parameters (head dimension 64, as vLLM's kernels want).
HALF_B = {"source": "tiny-llama", "hidden_size": 1280, "num_layers": 24, "num_heads": 20, "intermediate_size": 3456}
TINY = {"source": "tiny-llama"}

#: Peak dense bf16 FLOPS by device name (vendors' datasheets, without sparsity).
PEAK_BF16 = {
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}

#: Records the stage's peak allocated GPU memory, beside its metrics.
PEAK_PLUGIN = """
import json, torch
from align import hookimpl

@hookimpl
def align_stage_starting(context):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

@hookimpl
def align_stage_finished(context, outcome):
    if torch.cuda.is_available():
        (context.run_dir / "peak.json").write_text(json.dumps({"peak": torch.cuda.max_memory_allocated()}))
"""


def stage_recipe(model: Any, precision: str, stage: str, settings: dict[str, Any]) -> str:
    return json.dumps({"model": model, "backend": {"precision": precision}, "stages": {stage: settings}})


def run(recipe: str, folder: Path, plugins: Path) -> dict[str, Any]:
    """Run a recipe; its stage's metrics records, summary metrics and peak memory."""
    path = folder / "recipe.yaml"
    path.write_text(recipe)
    command = [sys.executable, "-m", "align.cli", "run", str(path), "--run-dir", str(folder / "run")]
    result = subprocess.run(
        [*command, "--plugins-dir", str(plugins), "--no-memory-check"], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"{path} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((folder / "run" / "summary.json").read_text())
    (name,) = summary["stages"]
    records = [json.loads(line) for line in (folder / "run" / "logs" / f"{name}.metrics.jsonl").open()]
    peak = folder / "run" / "peak.json"
    return {
        "records": records,
        "metrics": summary["stages"][name]["metrics"],
        "peak": json.loads(peak.read_text())["peak"] if peak.exists() else None,
    }


def planned(recipe: str, folder: Path) -> int:
    from align.memory import plan_recipe
    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe

    path = folder / "plan.yaml"
    path.write_text(recipe)
    plugins = get_plugin_manager()
    _, (plan,) = plan_recipe(load_recipe(path, [], plugins), plugins)
    return plan.on_device


def peak_flops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name(0)
    return name, next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser, default="")
    parser.add_argument("--tiny", action="store_true", help="the default tiny-llama and small sizes: checks the script")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--engines", default="hf,vllm")
    args = parser.parse_args()
    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="align-gpu-suite-"))
    model = json.loads(args.model) if args.model.startswith("{") else (args.model or (TINY if args.tiny else HALF_B))
    device, peak = peak_flops()
    precision = "bf16" if device != "CPU" else "fp32"
    length, batch = (128, 4) if args.tiny else (1024, 8)
    steps = min(args.steps, 4) if args.tiny else args.steps
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    plugins = work / "plugins"
    plugins.mkdir()
    (plugins / "peak.py").write_text(PEAK_PLUGIN)
    from common import model_folder

    from align.memory import ModelShape
    from align.plugin_manager import get_plugin_manager
    from align.recipe import validate_model

    spec = validate_model(model, get_plugin_manager())
    architecture = get_plugin_manager().get("model source", spec.source).architecture(spec.config)
    shape = ModelShape.from_architecture(architecture or {})
    model_folder(model)  # built once, before any timing
    print(f"device: {device}; model: {recipe_model(model)} ({shape.parameters / 1e6:.0f}M parameters)" if shape else "")

    rows = []
    lora = {"method": "lora", "r": 16, "alpha": 32}
    parts: dict[str, tuple[str, dict[str, Any]]] = {
        "sft lora": ("sft", {"data": "demo_sft", "peft": lora, "max_length": length, "batch_size": batch}),
        "sft lora, gradient checkpointing": (
            "sft",
            {
                "data": "demo_sft",
                "peft": lora,
                "max_length": length,
                "batch_size": batch,
                "gradient_checkpointing": True,
            },
        ),
        "dpo lora": ("dpo", {"data": "demo_pref", "peft": lora, "max_length": length, "batch_size": batch}),
    }
    for engine in args.engines.split(","):
        rl = {"data": "demo_prompts", "reward_functions": ["sentiment"], "peft": lora, "engine": engine, "steps": steps}
        parts[f"ppo {engine}"] = ("ppo", {**rl, "batch_size": 16, "mini_batch_size": 16, "max_new_tokens": 64})
        parts[f"grpo {engine}"] = ("grpo", {**rl, "batch_size": 4, "num_generations": 8, "max_new_tokens": 64})
    for label, (stage, settings) in parts.items():
        if stage in ("sft", "dpo"):
            settings = {**settings, "max_steps": steps, "logging_steps": 1, "save_steps": 0}
        recipe = stage_recipe(model, precision, stage, settings)
        folder = work / label.replace(" ", "_").replace(",", "")
        folder.mkdir()
        try:
            result = run(recipe, folder, plugins)
        except SystemExit as error:
            print(f"{label}: failed ({str(error).splitlines()[-1]})")
            continue
        row = {"part": label, "plan": planned(recipe, folder), "peak": result["peak"]}
        records = result["records"]
        if stage == "sft":
            final = next(r for r in reversed(records) if "train_runtime" in r)
            tokens = max(r.get("num_tokens", 0) for r in records)
            row["tokens/s"] = tokens / float(final["train_runtime"])
            row["s/step"] = float(final["train_runtime"]) / steps
            if shape and peak:
                row["MFU"] = 4 * shape.parameters * row["tokens/s"] / peak
        steps_s = [r["step_seconds"] for r in records if "step_seconds" in r][1:]
        if steps_s:
            row["s/step"] = statistics.median(steps_s)
            row["rollout s"] = statistics.median(r["rollout_seconds"] for r in records[1:] if "rollout_seconds" in r)
        elif stage == "dpo":
            final = next(r for r in reversed(records) if "train_runtime" in r)
            row["s/step"] = float(final["train_runtime"]) / steps
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{'part':<36} {'s/step':>8} {'tokens/s':>9} {'MFU':>6} {'plan GiB':>9} {'peak GiB':>9}")
    for row in rows:
        gib = 1 << 30
        print(
            f"{row['part']:<36} {row.get('s/step', float('nan')):8.2f} {row.get('tokens/s', float('nan')):9.0f} "
            f"{row.get('MFU', float('nan')):6.1%} {row['plan'] / gib:9.2f} "
            f"{(row['peak'] or float('nan')) / gib:9.2f}"
        )


if __name__ == "__main__":
    main()
