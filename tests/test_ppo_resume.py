"""A resumed online-RL stage (PPO, GRPO) equals an uninterrupted one: same weights, same metrics, and never
a broken checkpoint.

Each run is an ``align run`` subprocess, as a user's would be, with one thread: the runs compared must do
their arithmetic the same way, and on two cores one thread is also the fastest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_align

RECIPES = {
    "ppo": """
model: tiny-llama
stages:
  ppo:
    data: demo_prompts
    reward_functions: [sentiment]
    steps: 8
    batch_size: 32
    mini_batch_size: 16
    learning_rate: 1.0e-4
    max_new_tokens: 24
    save_steps: 2
    score: {reward_function: sentiment, prompts: demo_prompts_test, samples: 16}
""",
    # Groups, a KL term (so a reference), micro-batches and chunked scoring: every part of the state.
    "grpo": """
model: tiny-llama
stages:
  grpo:
    data: demo_math_prompts
    reward_functions: [exact_answer, format]
    steps: 8
    batch_size: 4
    num_generations: 4
    mini_batch_size: 8
    micro_batch_size: 4
    forward_batch_size: 8
    ppo_epochs: 2
    beta: 0.04
    learning_rate: 1.0e-4
    max_new_tokens: 16
    save_steps: 2
    score: {reward_function: exact_answer, prompts: demo_math_test, samples: 16}
""",
}
ENV = {"OMP_NUM_THREADS": "1"}
#: The summary metrics a resumed run must report exactly as the uninterrupted one does.
COMPARED = ("task_score_before", "reward_first", "reward_last", "task_score", "task_score_std", "steps")
KILL_AT = 5  # the run is killed in step 5's metrics hook: step-4 is the last checkpoint written

HOLD = """
import os, time
from align import hookimpl

@hookimpl
def align_metrics_logged(context, step, metrics):
    # Hold the run here, after a checkpoint and before the next, until the test kills it.
    if step == int(os.environ["ALIGN_TEST_HOLD_AT"]):
        time.sleep(120)
"""

POISON = """
from align import hookimpl
from align.reward import RewardFunction

class Poison(RewardFunction):
    name = "poison"
    calls = 0

    def __call__(self, prompts, responses, **columns):
        # From the 4th step on, finite scores too large for float32 arithmetic: a reward function that
        # breaks mid-run and takes the loss to NaN or infinity (a NaN score is refused by name earlier).
        Poison.calls += 1
        return [1e38 if Poison.calls >= 4 else 0.0 for _ in responses]

@hookimpl
def align_register_reward_functions():
    return [Poison()]
"""


def align(recipe: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_align("run", str(recipe), "--run-dir", str(run_dir), *extra, env=ENV)


@pytest.fixture(scope="module", params=sorted(RECIPES))
def recipe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe of one stage, in a file named after it (``ppo.yaml``)."""
    path = tmp_path_factory.mktemp("recipe") / f"{request.param}.yaml"
    path.write_text(RECIPES[request.param])
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = align(recipe, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def killed(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run SIGKILLed once step 5's metrics are logged; tests copy it before rerunning it."""
    base = tmp_path_factory.mktemp("killed")
    plugins = base / "plugins"
    plugins.mkdir()
    (plugins / "hold.py").write_text(HOLD)
    run_dir = base / "run"
    args = ["run", str(recipe), "--run-dir", str(run_dir), "--plugins-dir", str(plugins)]
    process = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args],
        env={**os.environ, **ENV, "ALIGN_TEST_HOLD_AT": str(KILL_AT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    stage = recipe.stem
    while KILL_AT not in logged_steps(run_dir, stage) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert KILL_AT in logged_steps(run_dir, stage), "the run never reached the step it was to be killed at"
    assert not (run_dir / stage).exists()
    assert [p.name for p in checkpoints(run_dir, stage).iterdir()] == ["step-4"]
    return run_dir


def logged_steps(run_dir: Path, stage: str) -> list[int]:
    path = run_dir / "logs" / f"{stage}.metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if r["step"] is not None]  # None: the stage's final metrics


def checkpoints(run_dir: Path, stage: str) -> Path:
    (work,) = (run_dir / ".work").glob(f"{stage}-*")
    return work / "checkpoints"


def assert_same_result(run_dir: Path, reference: Path, stage: str) -> None:
    expected = load_file(reference / stage / "model.safetensors")
    got = load_file(run_dir / stage / "model.safetensors")
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    metrics = json.loads((run_dir / "summary.json").read_text())["stages"][stage]["metrics"]
    reference_metrics = json.loads((reference / "summary.json").read_text())["stages"][stage]["metrics"]
    assert {k: metrics.get(k) for k in COMPARED} == {k: reference_metrics[k] for k in COMPARED}


@pytest.mark.slow
def test_a_killed_and_rerun_stage_equals_an_uninterrupted_one(killed, uninterrupted, recipe, tmp_path):
    run_dir, stage = tmp_path / "run", recipe.stem
    shutil.copytree(killed, run_dir)
    result = align(recipe, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "step-4" in result.stderr
    steps = logged_steps(run_dir, stage)
    assert steps.count(4) == 1 and steps.count(KILL_AT) == 2 and steps[-1] == 8  # only step 5 was redone
    assert_same_result(run_dir, uninterrupted, stage)


@pytest.mark.slow
def test_incomplete_newer_checkpoints_are_skipped_for_the_last_complete_one(killed, uninterrupted, recipe, tmp_path):
    run_dir, stage = tmp_path / "run", recipe.stem
    shutil.copytree(killed, run_dir)
    folder = checkpoints(run_dir, stage)
    good = folder / "step-4"
    # Killed while the processes were writing their files: the folder is still under its temporary name.
    shutil.copytree(good, folder / ".partial-step-6", ignore=shutil.ignore_patterns("align_rl_state.json", "model*"))
    # Killed between the weights and the state file (what the old, non-atomic checkpoint could leave).
    shutil.copytree(good, folder / "step-6", ignore=shutil.ignore_patterns("align_rl_state.json"))
    # A state file whose files are not all there (a damaged copy, a disk that lost a file).
    shutil.copytree(good, folder / "step-8", ignore=shutil.ignore_patterns("optimizer.bin"))
    state = json.loads((folder / "step-8" / "align_rl_state.json").read_text())
    (folder / "step-8" / "align_rl_state.json").write_text(json.dumps({**state, "step": 8}))

    result = align(recipe, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-8: optimizer.bin is missing" in result.stderr
    assert "step-6: it has no align_rl_state.json" in result.stderr
    assert ".partial-step-6: the run stopped while writing it" in result.stderr
    assert f"resuming from {good}" in result.stderr
    assert_same_result(run_dir, uninterrupted, stage)


@pytest.mark.slow
def test_a_nan_loss_stops_before_its_checkpoint_and_keeps_the_last_good_one(recipe, tmp_path):
    stage = recipe.stem
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "poison.py").write_text(POISON)
    run_dir = tmp_path / "run"
    result = align(
        recipe,
        run_dir,
        "--plugins-dir",
        str(plugins),
        f"stages.{stage}.reward_functions=[format, poison]",
        f"stages.{stage}.score=null",
    )
    assert result.returncode == 1
    # Step 4 is a checkpoint step: its broken weights must not replace step 2's good ones.
    assert f"stage '{stage}' failed" in result.stderr
    assert re.search(r"the loss became (nan|inf) at step 4", result.stderr), result.stderr[-2000:]
    assert "training stopped and the last good checkpoint" in result.stderr and "step-2, is kept" in result.stderr
    assert "Traceback" not in result.stderr
    folder = checkpoints(run_dir, stage)
    assert [p.name for p in folder.iterdir()] == ["step-2"]
    kept = load_file(folder / "step-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert json.loads((folder / "step-2" / "align_rl_state.json").read_text())["step"] == 2
