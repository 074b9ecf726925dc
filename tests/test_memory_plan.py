"""The memory plan: its parameter counts are the models' own, its parts follow the settings that change
memory, and `align run` refuses a stage that cannot fit before anything trains."""

from __future__ import annotations

import pytest

from align import AlignError
from align.backend import Backend
from align.memory import ModelShape, adam_and_gradients, parse_bytes, plan_recipe, weights
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.schema import build
from conftest import run_align


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default tiny-llama: its shape as the plan reads it, and the model itself."""
    from transformers import AutoModelForCausalLM

    source = get_plugin_manager().get("model source", "tiny-llama")
    config = build(source.Config, {"num_layers": 3, "intermediate_size": 320}, "model")
    shape = ModelShape.from_architecture(source.architecture(config))
    model = AutoModelForCausalLM.from_pretrained(source.materialize(config, tmp_path_factory.mktemp("models")))
    return shape, model


def test_the_plans_parameter_count_is_the_models(tiny):
    shape, model = tiny
    assert shape.parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "peft",
    [
        {"method": "lora", "r": 4},
        {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
        {"method": "freeze", "trainable_layers": 1},
    ],
    ids=["lora-all-linear", "lora-q-v", "freeze"],
)
def test_each_peft_methods_trainable_count_is_what_it_trains(tiny, peft):
    import copy

    shape, model = tiny
    method = get_plugin_manager().get("peft method", peft["method"])
    config = build(method.Config, {k: v for k, v in peft.items() if k != "method"}, "peft")
    trained = method.apply(copy.deepcopy(model), config, "causal")
    assert method.trainable_parameters(config, shape) == sum(p.numel() for p in trained.parameters() if p.requires_grad)


def test_zero_shards_and_offload_moves_what_deepspeed_does():
    single = Backend()
    zero2 = Backend(kind="deepspeed", num_processes=4, zero_stage=2)
    zero3 = Backend(kind="deepspeed", num_processes=4, zero_stage=3, offload_optimizer=True, offload_params=True)
    parts = {b.kind + str(b.zero_stage): adam_and_gradients("x", 1000, b) for b in (single, zero2)}
    assert [n.bytes for n in parts["single2"]] == [4000, 8000]  # gradients, then Adam's two moments
    assert [n.bytes for n in parts["deepspeed2"]] == [1000, 2000]
    offloaded = adam_and_gradients("x", 1000, zero3)
    assert offloaded[1].where == "cpu"
    assert weights("policy", 1000, 4, zero3, trained=True).where == "cpu"
    assert weights("reference", 1000, 2, zero3, trained=False).bytes == 2000  # frozen: whole on each process


def plan_of(write_recipe, text: str):
    pm = get_plugin_manager()
    shape, plans = plan_recipe(load_recipe(write_recipe(text), [], pm), pm)
    return {plan.stage: plan for plan in plans}


def test_the_settings_that_save_memory_lower_the_plan(write_recipe):
    base = "model: tiny-llama\nstages:\n  sft: {data: demo_sft, max_length: 512, batch_size: 16"
    plain = plan_of(write_recipe, base + "}\n")["sft"].on_device
    checkpointed = plan_of(write_recipe, base + ", gradient_checkpointing: true}\n")["sft"].on_device
    smaller = plan_of(write_recipe, base.replace("batch_size: 16", "batch_size: 4") + "}\n")["sft"].on_device
    assert checkpointed < plain and smaller < plain

    grpo = "model: tiny-llama\nstages:\n  grpo: {data: demo_math_prompts, reward_functions: [exact_answer], beta: 0.1"
    whole = plan_of(write_recipe, grpo + "}\n")["grpo"]
    micro = plan_of(write_recipe, grpo + ", micro_batch_size: 2}\n")["grpo"]
    offloaded = plan_of(write_recipe, grpo + ", offload_frozen_models: true}\n")["grpo"]
    assert micro.on_device < whole.on_device
    assert offloaded.on_device < whole.on_device
    assert any(n.what == "reference weights" and n.where == "cpu" for n in offloaded.needs)


def test_plan_prints_each_stage_and_its_parts():
    result = run_align("plan", "examples/quickstart.yaml", "--device-memory", "24GB")
    assert result.returncode == 0, result.stderr
    assert "memory plan, per process, against --device-memory 24GB" in result.stdout
    for stage in ("sft", "rm", "ppo", "dpo", "eval"):
        assert f"  {stage} " in result.stdout
    assert "reference weights" in result.stdout and "Adam states" in result.stdout


def test_a_stage_that_cannot_fit_is_refused_before_anything_trains_unless_told(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: tiny-llama\nstages:\n  sft: {data: demo_sft, max_steps: 1, batch_size: 4, max_length: 128}\n"
    )
    run_dir = tmp_path / "run"
    refused = run_align("run", str(recipe), "--run-dir", str(run_dir), "--device-memory", "8MB")
    assert refused.returncode == 2, refused.stderr
    assert "stage 'sft' needs about" in refused.stderr and "--device-memory 8MB has 8.0 MiB" in refused.stderr
    assert "gradient_checkpointing: true" in refused.stderr and "--no-memory-check" in refused.stderr
    assert not run_dir.exists()
    forced = run_align("run", str(recipe), "--run-dir", str(run_dir), "--device-memory", "8MB", "--no-memory-check")
    assert forced.returncode == 0, forced.stderr
    assert "DOES NOT FIT" in forced.stderr


@pytest.mark.parametrize(
    ("text", "size"), [("80GB", 80 << 30), ("24 GiB", 24 << 30), ("512MiB", 512 << 20), ("1.5T", 3 << 39)]
)
def test_memory_sizes_read_as_people_write_them(text, size):
    assert parse_bytes(text) == size


def test_a_size_that_is_not_one_is_refused():
    with pytest.raises(AlignError, match="memory size 'lots' is not a size"):
        parse_bytes("lots")
