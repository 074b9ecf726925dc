"""The kto, orpo and simpo stages: they learn the demo preference on held-out pairs, their policies beat
the SFT policy they start from on the quickstart task, and kto trains on LLaMA-Factory's KTO data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.runner import run_recipe
from conftest import LLAMA_FACTORY, needs_external, run_align

STAGES = ("kto", "orpo", "simpo")

# The quickstart's SFT, then each stage from it, as siblings. `eval_on_start` (a TrainingArguments option,
# passed through) evaluates the held-out pairs before the first step, to compare with the end.
CHAIN = """
model: tiny-llama
defaults:
  score: {reward_function: sentiment, prompts: demo_prompts_test, samples: 64}
stages:
  sft:
    data: demo_sft
    max_steps: 150
    batch_size: 16
    learning_rate: 1.0e-3
    logging_steps: 25
  kto:
    policy: sft
    data: demo_pref
    eval_size: 32
    max_steps: 40
    batch_size: 16
    learning_rate: 5.0e-4
    logging_steps: 10
    eval_on_start: true
  orpo:
    policy: sft
    data: demo_pref
    eval_size: 32
    max_steps: 40
    batch_size: 16
    learning_rate: 1.0e-3
    beta: 1.0
    logging_steps: 10
    eval_on_start: true
  simpo:
    policy: sft
    data: demo_pref
    eval_size: 32
    max_steps: 40
    batch_size: 16
    learning_rate: 5.0e-4
    beta: 2.0
    simpo_gamma: 1.0
    logging_steps: 10
    eval_on_start: true
"""


def run(tmp_path: Path, text: str, name: str = "run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    pm = get_plugin_manager()
    return run_recipe(load_recipe(path, [], pm), pm, run_dir=tmp_path / name)


def metrics_log(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / f"{stage}.metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory):
    """SFT once, then kto, orpo and simpo from it; returns the summary and the run folder."""
    tmp_path = tmp_path_factory.mktemp("preference_stages")
    summary = run(tmp_path, CHAIN)
    assert summary.status == "done", summary.error
    return summary, tmp_path / "run"


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_learns_the_preference_on_held_out_pairs(chain, stage):
    summary, run_dir = chain
    before = next(r for r in metrics_log(run_dir, stage) if "eval_rewards/margins" in r)  # eval_on_start
    assert before["step"] == 0
    after = summary.stages[stage].metrics  # trainer.evaluate() after the last step, on the same pairs
    if stage == "kto":
        # The policy starts as its reference: every implied reward is 0, and so is each row's loss, 1 - σ(0) = 0.5.
        assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert before["eval_demo_pref_loss"] == pytest.approx(0.5, abs=1e-6)
        assert after["eval_reward_margin"] >= 1.0
        assert after["eval_reward_desirable"] > after["eval_reward_undesirable"]
        assert after["eval_loss"] < 0.45
    else:  # no reference: the SFT policy already has a reward, near chance on these pairs
        assert after["eval_reward_accuracy"] >= 0.85
        assert after["eval_reward_accuracy"] >= before["eval_rewards/accuracies"] + 0.2
        assert after["eval_reward_margin"] >= before["eval_rewards/margins"] + 0.5
    assert after["eval_loss"] < before["eval_demo_pref_loss"]
    manifest = json.loads((run_dir / stage / "align-manifest.json").read_text())
    assert manifest["inputs"]["policy"]["producer"] == "sft"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_each_policy_beats_the_sft_policy_it_started_from_on_the_task(chain, stage):
    summary, _ = chain
    sft = summary.stages["sft"].metrics["task_score"]  # about 0: the SFT data is half positive, half negative
    aligned = summary.stages[stage].metrics["task_score"]  # positive words count +1, negative -1
    assert sft < 0.3
    assert aligned >= 0.6 and aligned >= sft + 0.5


# ---------------------------------------------------------------------------------------------- KTO data


@pytest.mark.slow
@needs_external
def test_kto_trains_on_llama_factorys_kto_demo(tmp_path):
    text = f"""
model: tiny-llama
dataset_dir: {LLAMA_FACTORY}
stages:
  kto:
    data: [{{dataset: kto_en_demo, num_samples: 64, eval_size: 8}}]
    max_steps: 4
    batch_size: 4
    learning_rate: 1.0e-4
    logging_steps: 1
"""
    summary = run(tmp_path, text)
    assert summary.status == "done", summary.error
    metrics = summary.stages["kto"].metrics
    assert metrics["steps"] == 4
    assert metrics["first_loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference at step one
    for name in ("train_loss", "train_kl", "eval_kto_en_demo_loss", "eval_reward_desirable", "eval_reward_undesirable"):
        assert math.isfinite(metrics[name]), name
    report = json.loads((tmp_path / "run" / "logs" / "kto.data.json").read_text())
    assert report["loaded"][0]["dataset"] == "kto_en_demo" and report["train_rows"] > 0


# ---------------------------------------------------------------------------------------------- explain


@pytest.mark.parametrize(
    ("stage", "says"),
    [
        ("kto", ["Ethayarajh et al. 2024", "KTOTrainer", "feedback", "desirable_weight", "undesirable_weight"]),
        ("orpo", ["Hong et al. 2024", "ORPOTrainer", "odds", "without Reference Model"]),
        ("simpo", ["Meng et al. 2024", "CPOTrainer", "simpo_gamma", "Target reward margin"]),
    ],
)
def test_align_explain_documents_each_stage(stage, says):
    result = run_align("explain", stage)
    assert result.returncode == 0, result.stderr
    for text in [*says, "beta", "learning_rate", "eval_size", "score", "produces: a policy"]:
        assert text in result.stdout, text
