"""The sft stage on the tiny model and the demo data, with every lifecycle hook watched."""

from __future__ import annotations

import inspect
import json

import pytest

from align import hookimpl, hookspecs
from align.plugin_manager import REGISTRIES, get_plugin_manager, hook_names
from align.recipe import load_recipe
from align.runner import run_recipe

RECIPE = """
model: tiny-llama
stages:
  sft:
    data: demo_sft
    max_steps: 30
    batch_size: 16
    learning_rate: 1.0e-3
    logging_steps: 5
"""


def recorder_plugin(calls: list[str]) -> type:
    """A plugin with one implementation of every hook, each appending its name to ``calls``.

    pluggy passes arguments by name, so each function is given its spec's exact signature.
    """
    namespace = {}
    for name in hook_names():
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        if name == "align_run_stage":  # a wrapper, so that align's own implementation still runs
            source = f"def {name}({params}):\n    record('{name}')\n    return (yield)\n"
            options = {"wrapper": True}
        else:
            result = "[]" if name.startswith("align_register_") else "None"
            source = f"def {name}({params}):\n    record('{name}')\n    return {result}\n"
            options = {}
        scope = {"record": calls.append}
        exec(source, scope)
        namespace[name] = staticmethod(hookimpl(**options)(scope[name]))
    return type("Recorder", (), namespace)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    (folder / "sft.yaml").write_text(RECIPE)
    calls: list[str] = []
    pm = get_plugin_manager()
    pm.add_plugin(recorder_plugin(calls), "recorder")
    for kind in REGISTRIES:
        pm.registry(kind)
    recipe = load_recipe(folder / "sft.yaml", [], pm)
    summary = run_recipe(recipe, pm, run_dir=folder / "run")
    return folder, summary, calls, pm


@pytest.mark.slow
def test_sft_loss_falls_on_the_demo_data(sft_run):
    folder, summary, _, _ = sft_run
    assert summary.status == "done", summary.error
    losses = [
        json.loads(line)["loss"]
        for line in (folder / "run" / "logs" / "sft.metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 6
    assert losses[-1] < 0.75 * losses[0]
    assert summary.stages["sft"].metrics["last_loss"] == pytest.approx(losses[-1])


@pytest.mark.slow
def test_sft_writes_a_checkpoint_transformers_loads_with_its_chat_template(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, _, _ = sft_run
    out = folder / "run" / "sft"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "generation" in tokenizer.chat_template
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    assert not (out / "checkpoints").exists()
    manifest = json.loads((out / "align-manifest.json").read_text())
    assert manifest["tokenizer"]["chat_template"] != "none"


@pytest.mark.slow
def test_every_hook_is_called_in_lifecycle_order(sft_run):
    _, _, calls, _ = sft_run
    assert set(calls) == set(hook_names())
    lifecycle = [c for c in calls if not c.startswith("align_register_") and c != "align_metrics_logged"]
    assert lifecycle == [
        "align_recipe_loaded",
        "align_stage_starting",
        "align_run_stage",
        "align_trainer_built",
        "align_stage_finished",
        "align_run_finished",
    ]


@pytest.mark.slow
def test_an_unchanged_sft_recipe_is_cached_the_second_time(sft_run):
    folder, _, _, pm = sft_run
    summary = run_recipe(load_recipe(folder / "sft.yaml", [], pm), pm, run_dir=folder / "run")
    assert summary.stages["sft"].status == "cached" and summary.stages["sft"].seconds < 2
