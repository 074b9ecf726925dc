"""How long the `align` command takes to start, against the interpreter and the heavy imports it avoids.

    python bench/cli_startup.py [--repeat N] [--model tiny-llama]

Prints the median wall time of each command over N runs (default 10). The goal for `align --help` and
`align plugins` is under 0.5 s on a 2-core machine: they must not import torch or transformers.
`align config` checks a one-stage recipe (sft on demo_sft) naming `--model` (a model source, a folder or a
hub id, as a recipe's `model:`; see common.py): the model source's own check (smollm2: that its packages
are installed) and the reading of the stage's data, without loading the model.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_model_argument, recipe_model

COMMANDS = {
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
    "align --help": [sys.executable, "-m", "align.cli", "--help"],
    "align plugins": [sys.executable, "-m", "align.cli", "plugins"],
    "align explain sft": [sys.executable, "-m", "align.cli", "explain", "sft"],
    "python -c 'import torch' (what is avoided)": [sys.executable, "-c", "import torch"],
    "python -c 'from trl import SFTTrainer' (what is avoided)": [sys.executable, "-c", "from trl import SFTTrainer"],
}


def median_seconds(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    add_model_argument(parser)
    args = parser.parse_args()
    recipe = Path(tempfile.mkdtemp(prefix="bench-cli-")) / "sft.yaml"
    recipe.write_text(f"model: {recipe_model(args.model)}\nstages:\n  sft:\n    data: demo_sft\n")
    config = [sys.executable, "-m", "align.cli", "config", str(recipe)]
    commands = {}
    for label, command in COMMANDS.items():
        if "import torch" in label:  # after align's own commands, before the imports it avoids
            commands[f"align config (sft on demo_sft, model {args.model})"] = config
        commands[label] = command
    print(f"median of {args.repeat} runs")
    for label, command in commands.items():
        print(f"  {median_seconds(command, args.repeat):6.3f} s  {label}")


if __name__ == "__main__":
    main()
