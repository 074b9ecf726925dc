"""SFT through align against the same SFT written directly with TRL: wall time, time per step and peak memory.

    python bench/sft_vs_trl.py [--model tiny-llama] [--steps 150] [--repeat 2] [--batch-size 16]
        [--learning-rate 1e-3] [--max-length 512] [--gradient-checkpointing]

Both sides fine-tune the model (`--model`, default the tiny Llama; `smollm2` or a folder: see common.py)
on the demo SFT data (alpaca, 256 rows) with the same settings: batch 16, learning rate 1e-3, max_length
512, loss on the replies only, no checkpoints, CPU, every weight trained. Each side runs in a fresh process
(so peak memory is its own), the two alternating `--repeat` times; the time is measured inside the process
from the start of the work (imports done) to the saved model, and `s/step` is the trainer's own
`train_runtime` over the steps (the training loop alone: no loading, data preparation or saving). align's
side is `align.runner.run_recipe` (data rendering, manifests, metrics files included); TRL's side is the
code a user would write: read the rows, make them `messages`, `SFTTrainer(...).train()`, save. With a chat
template that marks assistant turns (`{% generation %}`, as tiny-llama's does) TRL masks the prompt through
`assistant_only_loss`; SmolLM2's template has no such marks, so TRL gets prompt/completion pairs instead and
masks the prompt through `completion_only_loss` (the same tokens trained). `--gradient-checkpointing` turns
it on for both sides (align's `gradient_checkpointing: true`; TRL's `gradient_checkpointing=True`, both
non-reentrant).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_model_argument, has_generation_tags, model_folder, recipe_model

REPO = Path(__file__).resolve().parents[1]


def run_align(args: argparse.Namespace, work: Path) -> float:
    """Runs the recipe; returns the trainer's train_runtime (seconds of the training loop)."""
    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe
    from align.runner import run_recipe

    recipe = work / "sft.yaml"
    recipe.write_text(
        f"model: {recipe_model(args.model)}\nstages:\n  sft:\n    data: demo_sft\n"
        f"    max_steps: {args.steps}\n    batch_size: {args.batch_size}\n    learning_rate: {args.learning_rate}\n"
        f"    max_length: {args.max_length}\n    gradient_checkpointing: {str(args.gradient_checkpointing).lower()}\n"
        "    save_steps: 0\n    logging_steps: 10\n"
    )
    pm = get_plugin_manager()
    summary = run_recipe(load_recipe(recipe, [], pm), pm, run_dir=work / "run")
    assert summary.status == "done", summary.error
    log = [json.loads(line) for line in (work / "run" / "logs" / "sft.metrics.jsonl").read_text().splitlines()]
    return float(next(r["train_runtime"] for r in log if "train_runtime" in r))


def run_trl(args: argparse.Namespace, work: Path, model_dir: str) -> float:
    """Trains; returns the trainer's train_runtime (seconds of the training loop)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    marked = has_generation_tags(tokenizer)
    rows = json.loads((REPO / "datasets" / "demo_sft.json").read_text())
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            if marked
            else {
                "prompt": [{"role": "user", "content": r["instruction"]}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows
        ]
    )
    config = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        assistant_only_loss=marked,
        completion_only_loss=None if marked else True,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_pin_memory=False,
        seed=42,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    output = trainer.train()
    trainer.save_model(str(work / "trl" / "final"))
    return float(output.metrics["train_runtime"])


def child(side: str, args: argparse.Namespace, model_dir: str) -> None:
    import datasets
    import transformers  # noqa: F401 - imported before the clock starts, on both sides
    import trl  # noqa: F401

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    started = time.perf_counter()
    runtime = run_align(args, work) if side == "align" else run_trl(args, work, model_dir)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "seconds": seconds, "step_seconds": runtime / args.steps, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="(default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per row (default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args, args.model_dir)
        return

    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    model_dir = model_folder(args.model)
    options = [
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--learning-rate",
        str(args.learning_rate),
        "--max-length",
        str(args.max_length),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
    ]
    results: dict[str, list[dict]] = {"align": [], "trl": []}
    for _ in range(args.repeat):
        for side in ("align", "trl"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", side, *options, "--model-dir", model_dir],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            ).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"SFT, {args.model}, demo_sft, {args.steps} steps of {args.batch_size} rows, max_length {args.max_length}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, CPU; median of {args.repeat} "
        "runs each"
    )
    medians = {}
    for side, runs in results.items():
        medians[side] = statistics.median(r["seconds"] for r in runs)
        step = statistics.median(r["step_seconds"] for r in runs)
        peak = max(r["peak_mb"] for r in runs)
        print(
            f"  {side:5s} {medians[side]:7.2f} s   {step:7.3f} s/step   peak RSS {peak:7.0f} MB   runs: "
            + ", ".join(f"{r['seconds']:.2f}" for r in runs)
        )
    print(f"  align / TRL wall time: {medians['align'] / medians['trl']:.3f}x")


if __name__ == "__main__":
    main()
