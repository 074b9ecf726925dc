"""How long the `align` command takes to start, against the interpreter and the heavy imports it avoids.

    python bench/cli_startup.py [--repeat N]

Prints the median wall time of each command over N runs (default 10). The goal for `align --help` and
`align plugins` is under 0.5 s on a 2-core machine: they must not import torch or transformers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

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
    args = parser.parse_args()
    print(f"median of {args.repeat} runs")
    for label, command in COMMANDS.items():
        print(f"  {median_seconds(command, args.repeat):6.3f} s  {label}")


if __name__ == "__main__":
    main()
