"""A whole chain killed at random moments and rerun ends exactly as a chain that was never interrupted.

A tiny SFT → RM → PPO → DPO recipe, with checkpoints every few steps in every stage, is run once without
interruption. Then, in each trial, ``align run`` is started on a fresh run folder in its own process group,
SIGKILLed (the whole group, with no chance to clean up) at a moment drawn at random over the uninterrupted
run's duration, and run again on the same folder. The rerun must succeed the first time, and then, for
every stage:

* every ``*.safetensors`` file of the stage's published output (``<run>/<stage>/``) holds exactly the
  uninterrupted run's tensors, bit for bit;
* the stage's metrics in ``summary.json`` (train_loss, steps, first/last loss, rewards, task_score, held-out
  metrics, ...) are exactly the uninterrupted run's.

A kill can land anywhere: in the interpreter's start-up, while a model loads, between two steps, while a
trainer or RL checkpoint is written, after the last checkpoint (resuming with nothing left to train),
while a stage's output is saved or published, or between stages. The moments are drawn from a fixed seed,
so a failure is reproducible up to the run's timing; each trial prints its moment and where it landed.

A second test kills each trainer stage (sft, rm, dpo) at the moment a random kill rarely hits: right
after its last step's checkpoint is written, before the stage evaluates, scores and publishes.

``ALIGN_KILL_TRIALS=N`` runs N random trials instead of 3. Each run is an ``align run`` subprocess with one
thread, as in test_ppo_resume.py: the runs compared must do their arithmetic the same way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_align, tiny_llama

RECIPE = """
model: tiny-llama
defaults:
  score: {reward_function: sentiment, prompts: demo_prompts_test, samples: 16, max_new_tokens: 16}
stages:
  sft:
    data: demo_sft
    max_steps: 40
    batch_size: 8
    learning_rate: 1.0e-3
    logging_steps: 3       # not a divisor of save_steps: a checkpoint falls between two logs
    save_steps: 5          # (transformers also checkpoints the last step, whatever save_steps)
  rm:
    data: demo_pref        # policy: sft; 29 batches an epoch, so that it ends mid-epoch, as sft does
    max_steps: 30
    batch_size: 8
    learning_rate: 1.0e-3
    logging_steps: 4
    save_steps: 5
  ppo:
    data: demo_prompts     # policy: sft, reward_model: rm
    steps: 24
    batch_size: 8
    mini_batch_size: 4
    ppo_epochs: 2
    learning_rate: 1.0e-4
    max_new_tokens: 16
    logging_steps: 2
    save_steps: 3
  dpo:
    policy: sft
    data: demo_pref
    eval_size: 16
    max_steps: 30          # exactly one epoch (240 pairs)
    batch_size: 8
    learning_rate: 5.0e-4
    logging_steps: 4
    save_steps: 5
"""
STAGES = ("sft", "rm", "ppo", "dpo")
ENV = {"OMP_NUM_THREADS": "1"}
TRIALS = int(os.environ.get("ALIGN_KILL_TRIALS", "3"))
SEED = 20240917
#: Each trial's kill moment, as a fraction of the uninterrupted run's duration: one drawn in each of
#: TRIALS equal slices of [0, 1), so that even 3 trials reach the start, the middle and the end.
FRACTIONS = [(trial + random.Random(SEED * 1000 + trial).random()) / TRIALS for trial in range(TRIALS)]


#: The stages on a TRL trainer, each of which checkpoints its last step (transformers saves at the end).
TRAINER_STAGES = ("sft", "rm", "dpo")
KILL_AFTER_TRAINING = """
import os, signal
from align import hookimpl

@hookimpl
def align_trainer_built(context, trainer):
    from transformers import TrainerCallback

    class KillAfterTraining(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            # The last step's checkpoint is complete; the stage is not yet evaluated, scored or published.
            if context.name == os.environ["ALIGN_TEST_KILL_AFTER"]:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    trainer.add_callback(KillAfterTraining())
"""


def is_timing(metric: str) -> bool:
    """Wall-clock figures, which no two runs share. The stages' metrics hold none today (the seconds a
    stage took are in summary.json beside its metrics, not among them, and are not compared); this keeps
    the comparison honest if a stage starts reporting e.g. ``train_runtime`` or ``step_seconds``."""
    return metric.endswith(("_seconds", "_runtime", "_per_second"))


def align(recipe: Path, run_dir: Path) -> subprocess.CompletedProcess:
    return run_align("run", str(recipe), "--run-dir", str(run_dir), env=ENV)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "chain.yaml"
    path.write_text(RECIPE)
    tiny_llama()  # built before the clock starts: the killed runs find it in the cache
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The chain's run folder, and how long its ``align run`` took."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    started = time.monotonic()
    result = align(recipe, run_dir)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\nuninterrupted chain: {seconds:.1f} s; kill moments (fractions of it): {FRACTIONS}")
    return run_dir, seconds


def kill_at(recipe: Path, run_dir: Path, seconds: float, log: Path) -> bool:
    """Start ``align run``, SIGKILL its process group ``seconds`` later; False if it had finished by then."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir)],
            env={**os.environ, **ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches anything it started
        )
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
    return False


def where_it_stopped(run_dir: Path) -> str:
    """Where a killed run was, from its run folder: the stage, its checkpoints and last logged step."""
    try:
        stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    except FileNotFoundError:
        return "before the first stage (start-up)"
    running = [name for name, stage in stages.items() if stage["status"] == "running"]
    if not running:
        published = [name for name in STAGES if (run_dir / name).is_dir()]
        return f"between stages (published: {', '.join(published) or 'none'})"
    (stage,) = running
    work = next((run_dir / ".work").glob(f"{stage}-*"), None)
    folder = work / "checkpoints" if work else None
    names = ("checkpoint-*", "step-*", ".partial-*")  # a trainer's, an RL stage's, one being written
    checkpoints = sorted(p.name for n in names for p in folder.glob(n)) if folder and folder.is_dir() else []
    saved = bool(work and (work / "model.safetensors").exists())
    metrics = run_dir / "logs" / f"{stage}.metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]  # the last may be cut short
    logged = max((s for s in steps if s is not None), default=None)
    return (
        f"in {stage}: last logged step {logged}, checkpoints {checkpoints or 'none'}"
        + (", output being saved" if saved else "")
        + (" (published)" if (run_dir / stage).is_dir() else "")
    )


def differences(run_dir: Path, reference: Path) -> list[str]:
    """Every way the stages' outputs and metrics in ``run_dir`` differ from ``reference``'s."""
    found: list[str] = []
    summary = json.loads((run_dir / "summary.json").read_text())
    expected_summary = json.loads((reference / "summary.json").read_text())
    for stage in STAGES:
        outcome, expected = summary["stages"][stage], expected_summary["stages"][stage]
        if outcome["status"] not in ("done", "cached"):
            found.append(f"stage {stage}: status {outcome['status']} ({outcome['error']})")
            continue
        metrics = {k: v for k, v in outcome["metrics"].items() if not is_timing(k)}
        wanted = {k: v for k, v in expected["metrics"].items() if not is_timing(k)}
        for name in sorted(metrics.keys() | wanted.keys()):
            if metrics.get(name) != wanted.get(name):
                found.append(f"stage {stage}: metric {name} is {metrics.get(name)!r}, not {wanted.get(name)!r}")
        files = sorted(p.relative_to(reference / stage) for p in (reference / stage).rglob("*.safetensors"))
        got_files = sorted(p.relative_to(run_dir / stage) for p in (run_dir / stage).rglob("*.safetensors"))
        assert files, f"the uninterrupted {stage} published no weights"
        if got_files != files:
            found.append(f"stage {stage}: weights files {[str(f) for f in got_files]}, not {[str(f) for f in files]}")
            continue
        for file in files:
            tensors, wanted_tensors = load_file(run_dir / stage / file), load_file(reference / stage / file)
            if tensors.keys() != wanted_tensors.keys():
                found.append(f"stage {stage}: {file} holds tensors {sorted(tensors.keys() ^ wanted_tensors.keys())}")
            for name in sorted(tensors.keys() & wanted_tensors.keys()):
                if not torch.equal(tensors[name], wanted_tensors[name]):
                    delta = (tensors[name].double() - wanted_tensors[name].double()).abs().max().item()
                    found.append(f"stage {stage}: {file} tensor {name} differs (max |difference| {delta:.3g})")
    return found


def summary_line(run_dir: Path) -> str:
    stages: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())["stages"]
    return ", ".join(f"{name} {stage['status']}" for name, stage in stages.items())


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_chain_killed_at_a_random_moment_and_rerun_equals_an_uninterrupted_one(
    trial: int, recipe: Path, uninterrupted: tuple[Path, float], tmp_path: Path
) -> None:
    reference, duration = uninterrupted
    moment = FRACTIONS[trial] * duration
    run_dir = tmp_path / "run"
    killed = kill_at(recipe, run_dir, moment, tmp_path / "killed.log")
    landed = where_it_stopped(run_dir) if killed else "the run had finished"
    what = f"trial {trial}, killed at {moment:.2f} s of {duration:.1f} s ({landed})"
    print(f"\n{what}")

    started = time.monotonic()
    result = align(recipe, run_dir)
    assert result.returncode == 0, f"{what}: the rerun failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    resumed = [line.split("resuming from ")[1] for line in result.stderr.splitlines() if "resuming from " in line]
    print(f"  rerun: {time.monotonic() - started:.1f} s; {summary_line(run_dir)}; resumed from {resumed or 'nothing'}")
    found = differences(run_dir, reference)
    assert not found, f"{what}: the rerun differs from the uninterrupted run:\n" + "\n".join(found)


@pytest.mark.slow
def test_stages_killed_after_their_last_checkpoint_and_rerun_equal_an_uninterrupted_chain(
    recipe: Path, uninterrupted: tuple[Path, float], tmp_path: Path
) -> None:
    """The moment a random kill rarely hits: a trainer stage's last step is checkpointed, and the stage
    has not yet evaluated, scored and published its output. Each run is killed there in the next
    trainer stage (resuming the one killed before it), then a plain rerun finishes the chain."""
    reference, _ = uninterrupted
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "kill_after_training.py").write_text(KILL_AFTER_TRAINING)
    run_dir = tmp_path / "run"
    for stage in TRAINER_STAGES:
        process = subprocess.run(
            [sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir)]
            + ["--plugins-dir", str(plugins)],
            env={**os.environ, **ENV, "ALIGN_TEST_KILL_AFTER": stage},
            capture_output=True,
            text=True,
            timeout=600,
            start_new_session=True,  # the plugin kills its own process group
        )
        assert process.returncode == -signal.SIGKILL, f"{stage}: not killed:\n{process.stderr[-3000:]}"
        print(f"\nkilled after {stage}'s last step: {where_it_stopped(run_dir)}")
        assert not (run_dir / stage).exists()
    result = align(recipe, run_dir)
    assert result.returncode == 0, f"the rerun failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    found = differences(run_dir, reference)
    assert not found, "killed after each trainer stage's last checkpoint, the chain differs:\n" + "\n".join(found)
