"""SFT through align against the same SFT written directly with TRL: wall time and peak memory.

    python bench/sft_vs_trl.py [--steps 150] [--repeat 2]

Both sides fine-tune the tiny Llama on the demo SFT data (alpaca, 256 rows) with the same settings:
batch 16, learning rate 1e-3, max_length 512, loss on the replies only, no checkpoints, CPU. Each side
runs in a fresh process (so peak memory is its own), the two alternating `--repeat` times; the time is
measured inside the process from the start of the work (imports done) to the saved model. align's side
is `align.runner.run_recipe` (data rendering, manifests, metrics files included); TRL's side is the
code a user would write: read the rows, make them `messages`, `SFTTrainer(...).train()`, save.
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

REPO = Path(__file__).resolve().parents[1]


def run_align(steps: int, work: Path) -> None:
    from align.plugin_manager import get_plugin_manager
    from align.recipe import load_recipe
    from align.runner import run_recipe

    recipe = work / "sft.yaml"
    recipe.write_text(
        "model: tiny-llama\nstages:\n  sft:\n    data: demo_sft\n"
        f"    max_steps: {steps}\n    batch_size: 16\n    learning_rate: 1.0e-3\n    max_length: 512\n"
        "    save_steps: 0\n    logging_steps: 10\n"
    )
    pm = get_plugin_manager()
    summary = run_recipe(load_recipe(recipe, [], pm), pm, run_dir=work / "run")
    assert summary.status == "done", summary.error


def run_trl(steps: int, work: Path, model_dir: str) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = json.loads((REPO / "datasets" / "demo_sft.json").read_text())
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in rows
        ]
    )
    args = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        max_length=512,
        assistant_only_loss=True,
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
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    trainer.save_model(str(work / "trl" / "final"))


def child(side: str, steps: int, model_dir: str) -> None:
    import datasets
    import transformers  # noqa: F401 - imported before the clock starts, on both sides
    import trl  # noqa: F401

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    started = time.perf_counter()
    if side == "align":
        run_align(steps, work)
    else:
        run_trl(steps, work, model_dir)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "seconds": seconds, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.model_dir)
        return

    os.environ.setdefault("ALIGN_HOME", tempfile.mkdtemp(prefix="bench-align-home-"))
    from align.plugin_manager import get_plugin_manager
    from align.runner import align_home
    from align.schema import build

    source = get_plugin_manager().get("model source", "tiny-llama")
    model_dir = source.materialize(build(source.Config, {}, "model"), align_home() / "models")
    results: dict[str, list[dict]] = {"align": [], "trl": []}
    for _ in range(args.repeat):
        for side in ("align", "trl"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--model-dir", model_dir],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            ).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    print(f"SFT, tiny-llama, demo_sft, {args.steps} steps of 16 rows, CPU; median of {args.repeat} runs each")
    medians = {}
    for side, runs in results.items():
        medians[side] = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_mb"] for r in runs)
        print(
            f"  {side:5s} {medians[side]:7.2f} s   peak RSS {peak:7.0f} MB   runs: "
            + ", ".join(f"{r['seconds']:.2f}" for r in runs)
        )
    print(f"  align / TRL wall time: {medians['align'] / medians['trl']:.3f}x")


if __name__ == "__main__":
    main()
