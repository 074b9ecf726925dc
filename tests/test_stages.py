"""The sft, rm and dpo stages, PEFT methods, the shared backend, resuming and the NaN guard."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align import AlignError
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.runner import run_recipe
from conftest import REPO, TWO_PROCESS_BACKENDS, run_align, tiny_llama

SFT = """
  sft:
    data: demo_sft
    max_steps: 20
    batch_size: 16
    learning_rate: 1.0e-3
    logging_steps: 5
"""
RM = """
  rm:
    data: demo_pref
    max_steps: 30
    batch_size: 16
    learning_rate: 1.0e-3
    logging_steps: 5
"""
DPO = """
  dpo:
    data: demo_pref
    eval_size: 32
    max_steps: 20
    batch_size: 16
    learning_rate: 5.0e-4
    logging_steps: 1
"""


def recipe(*stages: str, head: str = "model: tiny-llama\n") -> str:
    return head + "stages:\n" + "".join(stages)


def run(tmp_path: Path, text: str, overrides=(), name: str = "run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    pm = get_plugin_manager()
    return run_recipe(load_recipe(path, list(overrides), pm), pm, run_dir=tmp_path / name)


def metrics_log(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / f"{stage}.metrics.jsonl").read_text().splitlines()]


def weights(path: Path, kind: str = "causal") -> dict:
    from align.models import load_model

    return {k: v.clone() for k, v in load_model(path, kind).state_dict().items()}


# ---------------------------------------------------------------------------------------------- stages


@pytest.mark.slow
def test_the_reward_model_ranks_held_out_pairs(tmp_path):
    summary = run(tmp_path, recipe(SFT, RM))
    assert summary.status == "done", summary.error
    metrics = summary.stages["rm"].metrics
    assert metrics["eval_accuracy"] >= 0.85  # held-out pairs, never trained on
    manifest = json.loads((tmp_path / "run" / "rm" / "align-manifest.json").read_text())
    assert manifest["inputs"]["policy"]["producer"] == "sft"  # rm starts from sft by default
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "rm")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


@pytest.mark.slow
def test_dpo_starts_at_ln2_and_its_reward_accuracy_rises(tmp_path):
    summary = run(tmp_path, recipe(DPO))  # DPO alone: the policy and reference are the base model
    assert summary.status == "done", summary.error
    log = [r for r in metrics_log(tmp_path / "run", "dpo") if "rewards/accuracies" in r]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step one
    first, last = log[0]["rewards/accuracies"], summary.stages["dpo"].metrics["train_reward_accuracy"]
    assert first < 0.5 and last >= 0.9
    assert summary.stages["dpo"].metrics["eval_reward_accuracy"] >= 0.8  # on held-out pairs
    assert summary.stages["dpo"].metrics["train_reward_margin"] > 0
    assert (
        json.loads((tmp_path / "run" / "dpo" / "align-manifest.json").read_text())["inputs"]["policy"]["producer"]
        == "base"
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust"])
def test_dpo_offers_trls_loss_types(tmp_path, loss):
    overrides = [f"stages.dpo.loss_type=[{loss}]", "stages.dpo.max_steps=2"]
    if loss == "robust":
        overrides.append("stages.dpo.label_smoothing=0.1")
    summary = run(tmp_path, recipe(DPO), overrides)
    assert summary.status == "done", summary.error
    assert summary.stages["dpo"].metrics["steps"] == 2


@pytest.mark.slow
def test_a_lora_chain_hands_adapters_on_by_merging(tmp_path):
    from peft import PeftConfig

    summary = run(tmp_path, recipe(SFT, RM, DPO), ["defaults.peft={method: lora, r: 4}", "defaults.learning_rate=5e-3"])
    assert summary.status == "done", summary.error
    run_dir = tmp_path / "run"
    for stage, base in (("sft", None), ("rm", run_dir / "sft"), ("dpo", run_dir / "sft")):
        config = PeftConfig.from_pretrained(run_dir / stage)  # every output is an adapter peft loads
        if base is not None:
            assert config.base_model_name_or_path == str(base)  # stacked on the merged sft adapter
    assert not (run_dir / "dpo" / "ref").exists()  # TRL's reference copy of the adapter is not published
    assert summary.stages["rm"].metrics["eval_accuracy"] >= 0.7

    result = run_align("export", str(run_dir / "dpo"), str(tmp_path / "merged"), "--merge")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    sft_merged = weights(run_dir / "sft")
    base = weights(Path(PeftConfig.from_pretrained(run_dir / "sft").base_model_name_or_path))
    assert not (sft_merged[name] == base[name]).all()  # the sft adapter is in
    assert not (merged[name] == sft_merged[name]).all()  # and the dpo adapter on top of it


@pytest.mark.slow
def test_freeze_trains_only_the_last_layers(tmp_path):
    summary = run(
        tmp_path, recipe(SFT), ["stages.sft.peft={method: freeze, trainable_layers: 1}", "stages.sft.max_steps=5"]
    )
    assert summary.status == "done", summary.error
    tuned = weights(tmp_path / "run" / "sft")
    base = weights(tiny_llama())
    assert (tuned["model.layers.0.mlp.up_proj.weight"] == base["model.layers.0.mlp.up_proj.weight"]).all()
    assert not (tuned["model.layers.1.mlp.up_proj.weight"] == base["model.layers.1.mlp.up_proj.weight"]).all()


@pytest.mark.slow
def test_dora_trains_an_adapter(tmp_path):
    summary = run(tmp_path, recipe(SFT), ["stages.sft.peft={method: dora}", "stages.sft.max_steps=3"])
    assert summary.status == "done", summary.error
    config = json.loads((tmp_path / "run" / "sft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["target_modules"]


@pytest.mark.slow
def test_metrics_reach_tensorboard(tmp_path):
    summary = run(tmp_path, recipe(SFT), ["stages.sft.max_steps=5"])
    assert summary.status == "done", summary.error
    assert list((tmp_path / "run" / "tensorboard" / "sft").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------- settings


def test_trl_options_align_does_not_name_pass_through(tmp_path, write_recipe):
    pm = get_plugin_manager()
    loaded = load_recipe(write_recipe(recipe(SFT)), ["stages.sft.lr_scheduler_type=constant"], pm)
    assert loaded.stages["sft"].passthrough == {"lr_scheduler_type": "constant"}
    assert loaded.to_plain()["stages"]["sft"]["lr_scheduler_type"] == "constant"


def test_a_key_neither_align_nor_trl_knows_suggests_from_both(write_recipe):
    pm = get_plugin_manager()
    with pytest.raises(
        AlignError, match=r"unknown key 'stages.sft.lr_schedular_type' \(did you mean 'lr_scheduler_type'\?\)"
    ):
        load_recipe(write_recipe(recipe(SFT)), ["stages.sft.lr_schedular_type=constant"], pm)
    with pytest.raises(AlignError, match=r"did you mean 'learning_rate'"):
        load_recipe(write_recipe(recipe(SFT)), ["stages.sft.lerning_rate=1"], pm)


@pytest.mark.slow
def test_a_passed_through_option_takes_effect_and_a_clash_is_explained(tmp_path):
    summary = run(tmp_path, recipe(SFT), ["stages.sft.lr_scheduler_type=constant", "stages.sft.max_steps=10"])
    assert summary.status == "done", summary.error
    rates = {r["learning_rate"] for r in metrics_log(tmp_path / "run", "sft") if "learning_rate" in r}
    assert rates == {1e-3}
    with pytest.raises(AlignError, match="num_train_epochs is set by align from its own settings"):  # at load
        run(tmp_path, recipe(SFT), ["stages.sft.num_train_epochs=2"], name="clash")


def test_unknown_peft_method_and_settings_are_errors(write_recipe):
    pm = get_plugin_manager()
    with pytest.raises(AlignError, match=r"unknown peft method 'lroa' \(did you mean 'lora'\?\)"):
        load_recipe(write_recipe(recipe(SFT)), ["stages.sft.peft={method: lroa}"], pm)
    with pytest.raises(
        AlignError,
        match=r"unknown key 'stages.sft.peft.rank' \(did you mean 'r'\?\)|unknown key 'stages.sft.peft.rank'",
    ):
        load_recipe(write_recipe(recipe(SFT)), ["stages.sft.peft={method: lora, rank: 8}"], pm)


def test_qlora_is_refused_when_the_recipe_is_checked_on_a_machine_without_cuda(write_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pm = get_plugin_manager()
    with pytest.raises(AlignError, match="qlora needs a CUDA GPU"):
        load_recipe(write_recipe(recipe(SFT)), ["stages.sft.peft={method: qlora}"], pm)
    result = run_align("config", str(write_recipe(recipe(SFT))), "stages.sft.peft={method: qlora, bits: 4}")
    assert result.returncode == 2 and "qlora needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_fsdp_is_refused_on_a_cpu_instead_of_silently_becoming_ddp(write_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    head = "model: tiny-llama\nbackend: {kind: fsdp, num_processes: 2}\n"
    with pytest.raises(AlignError, match="fsdp needs CUDA GPUs") as info:
        load_recipe(write_recipe(recipe(SFT, head=head)), [], get_plugin_manager())
    assert "kind: ddp or kind: deepspeed" in str(info.value)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{kind: single, num_processes: 2}", "kind: single runs one process, but 2 were asked for"),
        (
            "{kind: deepspeed, zero_stage: 2, offload_params: true}",
            "offload_params needs kind: deepspeed with zero_stage: 3",
        ),
        ("{kind: ddp, num_machines: 2}", "several machines need `main_address`"),
        ("{kind: deepspeed, zero_stage: 4}", "'backend.zero_stage' must be one of 1, 2, 3"),
        ("{precision: fp16}", "precision fp16 needs a GPU"),
    ],
)
def test_backend_mistakes_are_refused_before_any_work(write_recipe, backend, message):
    import torch

    if torch.cuda.is_available() and "fp16" in backend:
        pytest.skip("this machine has CUDA")
    with pytest.raises(AlignError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(
            write_recipe(recipe(SFT, head=f"model: tiny-llama\nbackend: {backend}\n")), [], get_plugin_manager()
        )


# ---------------------------------------------------------------------------------------------- backend


@pytest.mark.slow
@TWO_PROCESS_BACKENDS
def test_two_processes_on_a_cpu_train_one_checkpoint(tmp_path, backend):
    path = tmp_path / "r.yaml"
    path.write_text(recipe(SFT, head=f"model: tiny-llama\nbackend: {backend}\n"))
    result = run_align("run", str(path), "--run-dir", str(tmp_path / "run"), "stages.sft.max_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done"
    # 6 steps of 16 rows on each of 2 processes = 192 of the 256 rows: the processes shared one training.
    epochs = [r["epoch"] for r in metrics_log(tmp_path / "run", "sft") if "epoch" in r]
    assert epochs[-1] == pytest.approx(6 * 16 * 2 / 256)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "sft")  # a whole checkpoint, not shards
    assert model.model.layers[0].mlp.up_proj.weight.shape == (256, 128)


# ---------------------------------------------------------------------------------------------- failures

SLOW_STEPS = """
import os, time
from transformers import TrainerCallback
from align import hookimpl

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= int(os.environ["ALIGN_TEST_SLOW_AFTER"]):
            time.sleep(5)

@hookimpl
def align_trainer_built(context, trainer):
    trainer.add_callback(Slow())
"""

POISON = '''
import torch
from transformers import TrainerCallback
from align import hookimpl

class Poison(TrainerCallback):
    """Breaks the weights before step 5, as a diverging run would."""
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 4:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))

@hookimpl
def align_trainer_built(context, trainer):
    trainer.add_callback(Poison())
'''


@pytest.mark.slow
@pytest.mark.parametrize("backend", [[], ["backend.kind=ddp", "backend.num_processes=2"]], ids=["single", "ddp"])
def test_a_killed_sft_run_continues_from_its_last_checkpoint(tmp_path, backend):
    """Each process's loss since the last log is in the checkpoint, so on two processes too the resumed
    run logs and reports what the uninterrupted one does."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow_steps.py").write_text(SLOW_STEPS)
    path = tmp_path / "r.yaml"
    path.write_text(recipe(SFT))
    run_dir = tmp_path / "run"
    args = ["run", str(path), "--run-dir", str(run_dir), "stages.sft.save_steps=3", "stages.sft.max_steps=12", *backend]
    process = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args, "--plugins-dir", str(plugins)],
        env={**os.environ, "ALIGN_TEST_SLOW_AFTER": "6"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(run_dir.glob(".work/sft-*/checkpoints/checkpoint-6")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # let the checkpoint finish writing: the next one is 5 seconds of sleep away
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "sft").exists()

    # As if killed while writing checkpoint-9: weights cut short. It is skipped for checkpoint-6.
    (work,) = run_dir.glob(".work/sft-*/checkpoints")
    shutil.copytree(work / "checkpoint-6", work / "checkpoint-9")
    state = json.loads((work / "checkpoint-9" / "trainer_state.json").read_text())
    (work / "checkpoint-9" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 9}))
    total = json.loads((work / "checkpoint-9" / "align_loss.json").read_text())
    (work / "checkpoint-9" / "align_loss.json").write_text(json.dumps({**total, "step": 9}))
    weights = work / "checkpoint-9" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    result = run_align(*args)
    assert result.returncode == 0, result.stderr
    assert "checkpoint-9: model.safetensors has" in result.stderr
    assert "resuming from" in result.stderr and "checkpoint-6" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["sft"]["metrics"]["steps"] == 12
    logged_steps = [r["step"] for r in metrics_log(run_dir, "sft") if "loss" in r]
    assert 10 in logged_steps and logged_steps.count(5) == 1  # steps before the checkpoint are not redone
    assert {p.name for p in (run_dir / "sft").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert not (run_dir / "sft" / "checkpoints").exists()

    # The same weights and the same reported metrics as a run never stopped (train_loss: every step's mean).
    uninterrupted = run_align("run", str(path), "--run-dir", str(tmp_path / "uninterrupted"), *args[4:])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    import torch
    from safetensors.torch import load_file

    got, expected = (load_file(d / "sft" / "model.safetensors") for d in (run_dir, tmp_path / "uninterrupted"))
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    metrics = summary["stages"]["sft"]["metrics"]
    expected_metrics = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())["stages"]["sft"]["metrics"]
    assert metrics == expected_metrics


@pytest.mark.slow
def test_a_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "poison.py").write_text(POISON)
    path = tmp_path / "r.yaml"
    path.write_text(recipe(SFT))
    result = run_align(
        "run",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        "--plugins-dir",
        str(plugins),
        "stages.sft.save_steps=2",
        "stages.sft.logging_steps=1",
    )
    assert result.returncode == 1
    assert "the loss became nan at step 5; training stopped and the last good checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    (work,) = (tmp_path / "run" / ".work").glob("sft-*")
    assert sorted(p.name for p in (work / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    from safetensors.torch import load_file

    kept = load_file(work / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all(not t.isnan().any() for t in kept.values())


@pytest.mark.slow
def test_the_dpo_example_runs_from_the_readme(tmp_path):
    result = run_align(
        "run",
        str(REPO / "examples" / "dpo.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        "stages.dpo.logging_steps=1",
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["dpo"]["metrics"]
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["eval_reward_accuracy"] > 0.7


SFT_THEN_RM = """
model: tiny-llama
stages:
  sft: {data: demo_sft, max_steps: 10, batch_size: 8, learning_rate: 1.0e-3}
  rm: {data: demo_pref, max_steps: 5, batch_size: 8, learning_rate: 1.0e-3}
"""


@pytest.mark.slow
def test_a_stage_trains_the_same_weights_whether_the_stage_before_it_trained_or_came_from_the_cache(tmp_path):
    import torch
    from safetensors.torch import load_file

    recipe = tmp_path / "r.yaml"
    recipe.write_text(SFT_THEN_RM)
    run_dir = tmp_path / "run"
    first = run_align("run", str(recipe), "--run-dir", str(run_dir))  # sft trains, then rm in the same process
    assert first.returncode == 0, first.stderr[-3000:]
    trained_after_sft = load_file(run_dir / "rm" / "model.safetensors")
    again = run_align("run", str(recipe), "--run-dir", str(run_dir), "--force", "rm")  # sft from the cache
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sft: cached" in again.stderr
    trained_alone = load_file(run_dir / "rm" / "model.safetensors")
    # The reward model's new score head is initialised from the seed, not from what ran before it.
    assert all(torch.equal(trained_alone[name], trained_after_sft[name]) for name in trained_after_sft)
