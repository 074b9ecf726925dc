"""The online-RL loop: its wiring recomputed row by row, the defects it fixed, and its settings at work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from align import hookimpl
from align.models import load_model
from align.plugin_manager import get_plugin_manager
from align.plugins.reward_functions import sentiment
from align.recipe import load_recipe
from align.reward import RewardFunction
from align.rl.loop import OnlineRL
from align.runner import run_recipe
from align.sequences import token_values


def run(tmp_path: Path, stages: str, plugins: list[Any] = (), overrides=(), name="run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text("model: tiny-llama\nstages:\n" + stages)
    pm = get_plugin_manager()
    for index, plugin in enumerate(plugins):
        pm.add_plugin(plugin, f"test-plugin-{index}")
    summary = run_recipe(load_recipe(path, list(overrides), pm), pm, run_dir=tmp_path / name)
    assert summary.status == "done", summary.error
    return summary


def logged(tmp_path: Path, stage: str, name="run") -> list[dict[str, Any]]:
    lines = (tmp_path / name / "logs" / f"{stage}.metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] is not None]


class Spy:
    """What the loop was about to train on at each step: ``check(loop, batch)``'s result, or both."""

    def __init__(self) -> None:
        self.check: Any = None
        self.results: list[Any] = []


@pytest.fixture
def spy(monkeypatch) -> Spy:
    found = Spy()
    original = OnlineRL._optimise

    def optimise(loop, batch):
        found.results.append(found.check(loop, batch) if found.check else (loop, batch))
        return original(loop, batch)

    monkeypatch.setattr(OnlineRL, "_optimise", optimise)
    return found


# ---------------------------------------------------------------------------------------------- wiring

WIRED = """
  ppo:
    policy: base
    data: demo_prompts
    reward_functions: [sentiment]
    steps: 2
    batch_size: 4
    mini_batch_size: 4
    ppo_epochs: 1
    max_new_tokens: 8
    temperature: 0.7
    kl_coef: 0.05
    gamma: 1.0
    lam: 1.0
    whiten_advantages: false
    learning_rate: 1.0e-3
    save_steps: 0
"""


def row_logprobs(model, sequence, positions, response, temperature: float):
    logits = model(input_ids=sequence).logits[0, positions].float() / temperature
    return logits.log_softmax(-1).gather(1, response.unsqueeze(1)).squeeze(1)


def recompute(loop: OnlineRL, batch) -> dict[str, Any]:
    """Each row's log-probs, reference log-probs, values, score and returns, from its unpadded tokens alone."""
    reference = load_model(loop.context.inputs["policy"].path).eval()
    policy = loop._policy()
    critic = loop.accelerator.unwrap_model(loop.model).value
    temperature, kl_coef = loop.config.temperature, loop.config.kl_coef
    rows = []
    with torch.no_grad():
        for i in range(len(batch)):
            prompt = batch.input_ids[i, : batch.prompt_width][batch.attention_mask[i, : batch.prompt_width].bool()]
            length = int(batch.response_lengths[i])
            response = batch.responses[i, :length]
            sequence = torch.cat([prompt, response]).unsqueeze(0)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + length)  # the logits that predict each token
            own = row_logprobs(policy, sequence, positions, response, temperature)
            ref = row_logprobs(reference, sequence, positions, response, temperature)
            whole = {
                "input_ids": sequence,
                "attention_mask": torch.ones_like(sequence),
                "position_ids": torch.arange(sequence.shape[1]).unsqueeze(0),
            }
            values = token_values(critic, whole)
            score = sentiment(loop.tokenizer.decode(response, skip_special_tokens=True))
            kl = own - ref  # k1, the default estimator
            # γ = λ = 1: the return of token t is the score minus the KL penalty of tokens t and after.
            returns = score - kl_coef * kl.flip(0).cumsum(0).flip(0)
            rows.append(
                {
                    "length": length,
                    "logprobs": own,
                    "logprobs_at_1": row_logprobs(policy, sequence, positions, response, 1.0),
                    "ref_logprobs": ref,
                    "values": values[0, positions],
                    "score": score,
                    "returns": returns,
                }
            )
    return {"rows": rows, "batch": batch}


def test_the_loop_wiring_matches_a_row_by_row_recomputation(tmp_path, spy):
    spy.check = recompute
    run(tmp_path, WIRED)
    assert len(spy.results) == 2
    for step, found in enumerate(spy.results, start=1):
        batch = found["batch"]
        for i, row in enumerate(found["rows"]):
            n = row["length"]
            close = {"atol": 1e-5, "rtol": 0}
            # Positions and temperature: the policy's log-probs at 0.7, not at 1.
            torch.testing.assert_close(batch.logprobs[i, :n], row["logprobs"], **close)
            assert (batch.logprobs[i, :n] - row["logprobs_at_1"]).abs().max() > 1e-3
            assert (batch.logprobs[i, n:] == 0).all() and (batch.ref_logprobs[i, n:] == 0).all()
            # The reference is the frozen input policy, at the same temperature.
            torch.testing.assert_close(batch.ref_logprobs[i, :n], row["ref_logprobs"], **close)
            # The critic's value of each response token is read where the token is predicted.
            torch.testing.assert_close(batch.values[i, :n], row["values"], **close)
            # The score is the reward function's, placed at the last token: every return includes it.
            assert batch.scores[i].item() == pytest.approx(row["score"])
            torch.testing.assert_close(batch.returns[i, :n], row["returns"], **close)
            torch.testing.assert_close(batch.advantages[i, :n], row["returns"] - row["values"], **close)
        if step == 2:  # the policy moved; the reference did not
            assert (batch.logprobs - batch.ref_logprobs).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- defects


def test_the_learning_rate_stays_positive_until_the_last_update_when_minibatches_do_not_divide_the_batch(tmp_path):
    # 10 responses in minibatches of 4 are 3 updates per epoch; counting 2 (10 // 4) took the rate to 0
    # after two thirds of the run.
    stages = WIRED.replace("batch_size: 4\n    mini_batch_size: 4", "batch_size: 10\n    mini_batch_size: 4")
    run(tmp_path, stages.replace("steps: 2", "steps: 6"))
    rates = [r["learning_rate"] for r in logged(tmp_path, "ppo")]
    # Logged after each step's 3 updates of 18: the rate left for the next update.
    assert rates == pytest.approx([1e-3 * (1 - step / 6) for step in range(1, 7)], abs=1e-12)
    assert rates[4] > 0


class Recorder(RewardFunction):
    """Scores a response by its length and records what it was called with."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str], dict[str, list[Any]]]] = []

    def __call__(self, prompts, responses, **columns):
        self.calls.append((list(prompts), list(responses), columns))
        return [len(r) / 100 for r in responses]


class Constant(RewardFunction):
    name = "constant"

    def __call__(self, prompts, responses, **columns):
        return [1.0 for _ in responses]


class Registers:
    def __init__(self, *functions: RewardFunction) -> None:
        self.functions = functions

    @hookimpl
    def align_register_reward_functions(self):
        return list(self.functions)


GRPO = """
  grpo:
    policy: base
    data: demo_math_prompts
    steps: 2
    batch_size: 3
    num_generations: 4
    max_new_tokens: 8
    learning_rate: 1.0e-3
    save_steps: 0
"""


def test_reward_functions_receive_the_prompt_rows_columns_and_are_logged_each_under_its_name(tmp_path):
    recorder = Recorder()
    run(
        tmp_path,
        GRPO + "    reward_functions: [recorder, {function: format, weight: 0.5}]\n",
        plugins=[Registers(recorder)],
    )
    prompts, responses, columns = recorder.calls[0]
    assert len(prompts) == len(responses) == 12
    assert set(columns) == {"answer"} and len(columns["answer"]) == 12
    # A group's responses answer one prompt: they share its answer.
    groups = [columns["answer"][i : i + 4] for i in range(0, 12, 4)]
    assert all(len(set(group)) == 1 for group in groups)
    records = logged(tmp_path, "grpo")
    for record in records:
        assert {"reward", "reward_recorder", "reward_format", "response_length"} <= record.keys()
        assert record["reward"] == pytest.approx(record["reward_recorder"] + 0.5 * record["reward_format"], abs=1e-6)
    assert "kl" not in records[0]  # beta 0 and kl_coef 0: no reference at all


def test_groups_whose_rewards_are_all_equal_can_be_left_out_of_the_update(tmp_path, spy):
    summary = run(
        tmp_path,
        GRPO + "    reward_functions: [constant]\n    drop_uniform_groups: true\n",
        plugins=[Registers(Constant())],
    )
    records = logged(tmp_path, "grpo")
    assert [r["uniform_group_share"] for r in records] == [1.0, 1.0]
    assert "policy_loss" not in records[0]  # nothing to train on
    base = Path(spy.results[0][0].context.inputs["policy"].path)
    trained = load_file(Path(summary.stages["grpo"].artifact) / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert all(torch.equal(trained[name], original[name]) for name in original)


def test_beta_loads_a_reference_and_adds_the_kl_term_without_it_there_is_none(tmp_path, spy):
    run(tmp_path, GRPO + "    reward_functions: [exact_answer]\n    beta: 0.04\n", name="with")
    run(tmp_path, GRPO + "    reward_functions: [exact_answer]\n", name="without")
    with_beta, without = spy.results[0][0], spy.results[2][0]
    assert with_beta.reference is not None and without.reference is None
    # One update per batch: the sampling policy's log-probs are the update's own, and the KL is the β term's.
    assert "kl_loss" in logged(tmp_path, "grpo", "with")[0]
    assert not {"kl", "kl_loss"} & logged(tmp_path, "grpo", "without")[0].keys()


def test_micro_batches_and_chunked_scoring_train_the_same_weights_as_whole_batches(tmp_path):
    stages = WIRED.replace("steps: 2", "steps: 1").replace("ppo_epochs: 1", "ppo_epochs: 2")
    stages = stages.replace("batch_size: 4\n    mini_batch_size: 4", "batch_size: 8\n    mini_batch_size: 8")
    whole = run(tmp_path, stages, name="whole")
    split = run(tmp_path, stages + "    micro_batch_size: 3\n    forward_batch_size: 3\n", name="split")
    a = load_file(Path(whole.stages["ppo"].artifact) / "model.safetensors")
    b = load_file(Path(split.stages["ppo"].artifact) / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert logged(tmp_path, "ppo", "whole")[0]["policy_loss"] == pytest.approx(
        logged(tmp_path, "ppo", "split")[0]["policy_loss"], abs=1e-6
    )
