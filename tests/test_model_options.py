"""Model options every stage honours: they change memory and speed, never what is learned."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from align import AlignError
from align.backend import Backend
from align.model_options import check_attention, frozen_dtype, loading_kwargs, on_device
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.runner import run_recipe


def run(tmp_path: Path, text: str, name: str) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    pm = get_plugin_manager()
    summary = run_recipe(load_recipe(path, [], pm), pm, run_dir=tmp_path / name)
    assert summary.status == "done", summary.error
    return json.loads((tmp_path / name / "summary.json").read_text())["stages"]


SFT = (
    "model: tiny-llama\nstages:\n  sft: {{data: demo_sft, max_steps: 4, batch_size: 8, learning_rate: 1.0e-3{extra}}}\n"
)
GRPO = (
    "model: tiny-llama\nstages:\n  grpo: {{data: demo_math_prompts, reward_functions: [exact_answer, format], "
    "steps: 2, batch_size: 2, num_generations: 4, mini_batch_size: 8, beta: 0.04, learning_rate: 1.0e-4, "
    "max_new_tokens: 8{extra}}}\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [SFT, GRPO], ids=["sft", "grpo"])
def test_gradient_checkpointing_and_offloading_change_memory_not_what_is_learned(tmp_path, recipe, monkeypatch):
    import transformers.modeling_utils as modeling

    plain = run(tmp_path, recipe.format(extra=""), "plain")
    extra = ", gradient_checkpointing: true, attn_implementation: eager"
    if recipe is GRPO:
        extra += ", offload_frozen_models: true"
    recomputed = []  # transformers checkpoints through torch's function, and only in training mode
    original = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    saving = run(tmp_path, recipe.format(extra=extra), "saving")
    assert recomputed, "gradient checkpointing never engaged"
    (stage,) = plain
    compared = [k for k in plain[stage]["metrics"] if "seconds" not in k and "per_second" not in k and k != "seconds"]
    assert compared
    for key in compared:
        assert saving[stage]["metrics"][key] == pytest.approx(plain[stage]["metrics"][key], rel=1e-4, abs=1e-6), key


SPY = """
import json
from transformers import TrainerCallback
from align import hookimpl

class Spy(TrainerCallback):
    def __init__(self, path):
        self.path = path

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.path.write_text(json.dumps(model.is_gradient_checkpointing and model.training))

@hookimpl
def align_trainer_built(context, trainer):
    trainer.add_callback(Spy(context.run_dir / "spy.json"))
"""


def test_a_stage_with_gradient_checkpointing_trains_with_it(tmp_path):
    """The option reaches the model: the trainer's model recomputes its activations."""
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "spy.py").write_text(SPY)
    pm = get_plugin_manager(plugins_dir=plugin)
    path = tmp_path / "r.yaml"
    path.write_text(SFT.format(extra=", gradient_checkpointing: true"))
    summary = run_recipe(load_recipe(path, [], pm), pm, run_dir=tmp_path / "run")
    assert summary.status == "done", summary.error
    assert json.loads((tmp_path / "run" / "spy.json").read_text()) is True


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_its_package_is_refused_when_the_recipe_loads():
    with pytest.raises(AlignError, match="flash_attention_2, but the flash-attn package is not installed") as error:
        check_attention("flash_attention_2", "stages.sft")
    assert "attn_implementation: sdpa" in error.value.hint
    check_attention("sdpa", "stages.sft")  # the default needs nothing


def test_frozen_models_load_in_the_backends_precision_and_trained_ones_in_float32():
    import torch

    assert frozen_dtype(Backend(precision="bf16")) == torch.bfloat16
    assert loading_kwargs("sdpa", Backend(precision="bf16")) == {"attn_implementation": "sdpa", "dtype": torch.bfloat16}
    assert loading_kwargs("eager") == {"attn_implementation": "eager"}  # trained: float32 master weights


def test_offloaded_models_visit_the_device_only_while_in_use():
    moves: list[tuple[str, str]] = []

    class Model:
        def __init__(self, name: str) -> None:
            self.name = name

        def to(self, device: str) -> None:
            moves.append((self.name, device))

    models = [Model("reference"), None, Model("reward")]
    with on_device(models, "cuda:0", offload=True):
        assert moves == [("reference", "cuda:0"), ("reward", "cuda:0")]
    assert moves[2:] == [("reference", "cpu"), ("reward", "cpu")]
    moves.clear()
    with on_device(models, "cuda:0", offload=False):  # they live on the device: nothing moves
        pass
    assert moves == []


def test_an_unset_learning_rate_is_the_stages_default_for_its_peft_method(tmp_path):
    from align.peft_method import LearningRates

    path = tmp_path / "r.yaml"
    path.write_text(
        "model: tiny-llama\nstages:\n"
        "  full: {plugin: dpo, data: demo_pref}\n"
        "  lora: {plugin: dpo, data: demo_pref, peft: {method: lora}}\n"
        "  dora_grpo: {plugin: grpo, data: demo_math_prompts, reward_functions: [exact_answer], peft: {method: dora}}\n"
        "  set: {plugin: sft, data: demo_sft, learning_rate: 3.0e-3, peft: {method: lora}}\n"
    )
    pm = get_plugin_manager()
    stages = load_recipe(path, [], pm).stages
    rates = {name: spec.config.learning_rate for name, spec in stages.items()}
    assert rates == {"full": 1e-6, "lora": 5e-6, "dora_grpo": 1e-5, "set": 3e-3}  # a rate you set is yours
    dpo = pm.get("stage", "dpo").learning_rates
    assert isinstance(dpo, LearningRates) and "qwen3_lora_dpo.yaml" in dpo.adapter_source
