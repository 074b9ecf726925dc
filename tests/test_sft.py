"""The sft stage on the tiny model and the demo data, with every lifecycle hook watched."""

from __future__ import annotations

import inspect
import json

import pytest

from align import AlignError, hookimpl, hookspecs
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


def run_sft(tmp_path, recipe: str, overrides=()):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    pm = get_plugin_manager()
    return run_recipe(load_recipe(path, list(overrides), pm), pm, run_dir=tmp_path / "run")


@pytest.mark.slow
def test_each_datasets_held_out_loss_is_reported_on_its_own(tmp_path):
    recipe = RECIPE.replace(
        "    data: demo_sft\n",
        "    data:\n      - {dataset: demo_sft, eval_size: 16}\n      - {dataset: demo_sft_sharegpt, eval_size: 8}\n",
    )
    summary = run_sft(tmp_path, recipe, ["stages.sft.max_steps=10", "stages.sft.eval_steps=5"])
    assert summary.status == "done", summary.error
    metrics = summary.stages["sft"].metrics
    assert {"eval_demo_sft_loss", "eval_demo_sft_sharegpt_loss"} <= set(metrics)
    assert metrics["eval_demo_sft_loss"] != metrics["eval_demo_sft_sharegpt_loss"]
    logged = (tmp_path / "run" / "logs" / "sft.metrics.jsonl").read_text()
    assert logged.count("eval_demo_sft_loss") >= 2  # at step 5 and at step 10 (plus the final evaluation)
    report = json.loads((tmp_path / "run" / "logs" / "sft.data.json").read_text())
    assert report["train_rows"] == (256 - 16) + (128 - 8)


@pytest.mark.slow
def test_packing_trains_and_the_loss_falls(tmp_path):
    summary = run_sft(
        tmp_path, RECIPE, ["stages.sft.packing=true", "stages.sft.max_length=256", "stages.sft.batch_size=4"]
    )
    assert summary.status == "done", summary.error
    metrics = summary.stages["sft"].metrics
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"]
    assert 0 < metrics["padding_waste"] < 1  # what padding would have cost without packing


@pytest.mark.slow
def test_a_llama_factory_folder_is_used_unchanged_as_dataset_dir(tmp_path):
    from conftest import EXTERNAL, run_align

    folder = EXTERNAL / "llama-factory" / "data"
    if not folder.is_dir():
        pytest.skip("../shared/external is not present")
    (tmp_path / "r.yaml").write_text(RECIPE.replace("data: demo_sft", "data: identity"))
    result = run_align(
        "run",
        str(tmp_path / "r.yaml"),
        "--dataset-dir",
        str(folder),
        "--run-dir",
        str(tmp_path / "run"),
        "stages.sft.max_steps=2",
        "stages.sft.max_length=256",
    )
    assert result.returncode == 0, result.stderr
    assert "identity: read 91 rows, converted 91" in result.stderr
    manifest = json.loads((tmp_path / "run" / "sft" / "align-manifest.json").read_text())
    assert list(manifest["data_files"]) == [str(folder / "identity.json")]


def test_bad_rows_skipped_in_a_run_are_reported(tmp_path):
    data = tmp_path / "rows.json"
    good = {"instruction": "Review it", "output": "Great film"}
    data.write_text(json.dumps([good] * 8 + [{"instruction": "no answer"}, {"instruction": "x", "output": ""}]))
    summary = run_sft(
        tmp_path,
        RECIPE.replace("data: demo_sft", f"data: {data}"),
        ["stages.sft.on_bad_row=skip", "stages.sft.max_steps=1"],
    )
    assert summary.status == "done", summary.error
    report = json.loads((tmp_path / "run" / "logs" / "sft.data.json").read_text())
    assert report["loaded"] == [
        {"dataset": "rows", "rows": 10, "kept": 8, "skipped": {"missing_column": 1, "empty_turn": 1}}
    ]
    assert (
        "rows: read 10 rows, converted 8 (skipped 2: 1 missing_column, 1 empty_turn)"
        in (tmp_path / "run" / "logs" / "run.log").read_text()
    )


def test_a_bad_row_stops_the_recipe_before_training_naming_file_and_row(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(AlignError) as error:  # when the recipe loads: every stage's data is read then
        run_sft(tmp_path, RECIPE.replace("data: demo_sft", f"data: {data}"))
    assert str(error.value).startswith(f"{data} row 1: the column 'output' is missing")
    assert not (tmp_path / "run").exists()


def test_an_unknown_dataset_stops_the_recipe_with_a_suggestion(tmp_path):
    with pytest.raises(
        AlignError, match=r"'demo_sfft' is neither a registry entry nor a file \(did you mean 'demo_sft'\?\)"
    ):
        run_sft(tmp_path, RECIPE.replace("data: demo_sft", "data: demo_sfft"))
