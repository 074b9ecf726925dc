"""Every mistake in a recipe is caught before any work, with a message that names it.

The corpus in ``tests/recipes/bad`` holds one mistake per file, in a recipe or in the data files of
``tests/recipes/bad/data``; each file's ``# error:`` lines are what ``align config`` and ``align run``
must print for it (exit status 2, no traceback), and ``align run`` must leave an earlier run's outputs as
they were. Add a file to cover a new mistake.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from align import AlignError
from align.data import DataSource
from align.recipe import OWNED_OPTIONS, load_recipe
from align.schema import Bounds, bounds_of, build, describe, setting
from conftest import REPO, run_align

BAD = Path(__file__).parent / "recipes" / "bad"
BAD_RECIPES = sorted(BAD.glob("*.yaml"))


def expected_errors(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.removeprefix("# error: ") for line in lines if line.startswith("# error: ")]


# ------------------------------------------------------------------------------------------- the corpus


def test_the_corpus_is_there_and_every_file_says_what_it_expects():
    assert len(BAD_RECIPES) >= 70
    assert all(expected_errors(path) for path in BAD_RECIPES), "a bad recipe without `# error:` lines"


def needs(path: Path) -> list[Any]:
    if path.stem.startswith("vllm_"):  # the engine's own check comes first: "vllm is not installed"
        return [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]
    for prefix, module in (("flash_attention_", "flash_attn"), ("liger_kernel_", "liger_kernel")):
        if path.stem.startswith(prefix):  # the mistake is asking for it without it
            return [pytest.mark.skipif(importlib.util.find_spec(module) is not None, reason=f"{module} is installed")]
    return []


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding an earlier run's published output, which a refused recipe must leave alone."""
    run_dir = tmp_path_factory.mktemp("earlier") / "run"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "sft" / "model.safetensors").write_bytes(os.urandom(256))
    (run_dir / "sft" / "align_manifest.json").write_text('{"format": 2}')
    (run_dir / "summary.json").write_text('{"status": "done", "stages": {"sft": {"status": "done"}}}')
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=needs(p)) for p in BAD_RECIPES])
@pytest.mark.parametrize("command", ["config", "run"])
def test_a_bad_recipe_is_refused_with_exit_2_a_message_naming_the_mistake_and_nothing_touched(
    path, command, earlier_run, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(earlier_run, run_dir)
    before = snapshot(run_dir)
    extra = ["--run-dir", str(run_dir)] if command == "run" else []
    result = run_align(command, path.name, *extra, cwd=BAD)  # data files are named relative to the corpus
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout == ""  # nothing resolved was printed, nothing ran
    for expected in expected_errors(path):
        assert expected in result.stderr
    assert snapshot(run_dir) == before  # nothing trained, and the earlier output is intact


# -------------------------------------------------------------------- bounds: declared, enforced, shown


def builtin_settings_classes() -> dict[str, type]:
    """The settings classes of every built-in stage, PEFT method, rollout engine and model source, the
    backend, and the settings classes they nest (``score``, the items of ``data``)."""
    from align.backend import Backend
    from align.plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    found: dict[str, type] = {"backend": Backend}
    for kind in ("stage", "peft method", "rollout engine", "model source"):
        for name, entry in pm.registry(kind).items():
            if pm.origins[entry.plugin].where == "align":  # align's own, not a third party's
                found[f"{kind} {name}"] = entry.obj.Config
    for where, cls in list(found.items()):
        for field_name, hint in typing.get_type_hints(cls).items():
            for nested in _dataclasses_in(hint):
                found.setdefault(f"{where}.{field_name}", nested)
    return found


def _dataclasses_in(hint: Any) -> list[type]:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return [hint]
    return [found for arg in typing.get_args(hint) for found in _dataclasses_in(arg)]


def _is_numeric(hint: Any) -> bool:
    """int or float, alone, in a union or as list items; not bool and not a Literal of numbers."""
    if hint in (int, float):
        return True
    if typing.get_origin(hint) is Literal:
        return False
    return any(_is_numeric(arg) for arg in typing.get_args(hint))


def test_the_walk_finds_every_builtin_stage_and_the_nested_settings():
    classes = builtin_settings_classes()
    for stage in ("sft", "rm", "dpo", "kto", "orpo", "simpo", "ppo", "eval"):
        assert f"stage {stage}" in classes
    assert {"peft method lora", "rollout engine hf", "model source tiny-llama", "stage sft.score"} <= set(classes)
    assert any(cls.__name__ == "DataSource" for cls in classes.values())


def test_every_numeric_setting_of_a_builtin_declares_its_range_and_its_default_lies_in_it():
    missing, outside = [], []
    for where, cls in builtin_settings_classes().items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not _is_numeric(hints[field.name]):
                continue
            bounds = bounds_of(field)
            if bounds is None:
                missing.append(f"{where}: {field.name}")
                continue
            default = field.default if field.default is not dataclasses.MISSING else None
            if default is None and field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            for value in default if isinstance(default, list) else [default]:
                if value is not None and not bounds.allows(value):
                    outside.append(f"{where}: {field.name} = {value!r} is not {bounds}")
    assert not missing, "numeric settings without minimum=/maximum=/above=/below=: " + ", ".join(missing)
    assert not outside, "; ".join(outside)


def test_explain_shows_each_settings_range():
    sft = run_align("explain", "sft")
    assert sft.returncode == 0, sft.stderr
    for line in (
        "max_steps: int ≥ 1 or -1 (train for `epochs` instead) = -1",
        "epochs: float > 0 = 1.0",
        "batch_size: int ≥ 1 = 8",
        "seed: int in [0, 4294967295] = 42",
        "data[].weight: float > 0 = 1.0",  # the settings of each dataset of `data`
        "score.temperature: float ≥ 0 = 0.7",  # and of `score`
    ):
        assert f"\n  {line}\n" in sft.stdout
    ppo = run_align("explain", "ppo")
    assert "\n  steps: int ≥ 1 = 100\n" in ppo.stdout and "\n  gamma: float in [0, 1] = 1.0\n" in ppo.stdout
    assert "\n  reward_clip: float > 0 or null = None\n" in ppo.stdout
    lora = run_align("explain", "lora")
    assert "\n  r: int ≥ 1 = 8\n" in lora.stdout and "\n  dropout: float in [0, 1) = 0.05\n" in lora.stdout


@dataclass
class Ranged:
    count: int = setting(1, help="at least 1", minimum=1)
    share: float = setting(0.5, help="a fraction", minimum=0, maximum=1)
    rate: float | None = setting(None, help="above 0 or nothing", above=0)
    steps: int = setting(-1, help="-1 or at least 1", minimum=1, special={-1: "no limit"})
    weights: list[float] = setting(default_factory=list, help="each at least 0", minimum=0)
    open_top: float = setting(0.0, help="below 1", minimum=0, below=1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"count": 0}, "'x.count' must be at least 1; got 0"),
        ({"share": 1.5}, "'x.share' must be at least 0 and at most 1; got 1.5"),
        ({"share": -0.1}, "'x.share' must be at least 0 and at most 1; got -0.1"),
        ({"rate": 0}, "'x.rate' must be above 0; got 0.0"),
        ({"rate": float("nan")}, "'x.rate' must be above 0; got nan"),
        ({"steps": 0}, "'x.steps' must be at least 1, or -1 (no limit); got 0"),
        ({"steps": -2}, "'x.steps' must be at least 1, or -1 (no limit); got -2"),
        ({"weights": [1, 2, -3]}, "'x.weights[2]' must be at least 0; got -3.0"),
        ({"open_top": 1}, "'x.open_top' must be at least 0 and below 1; got 1.0"),
    ],
)
def test_build_refuses_a_value_out_of_range_naming_key_range_and_value(data, message):
    with pytest.raises(AlignError) as info:
        build(Ranged, data, "x")
    assert str(info.value) == message


def test_values_on_the_edges_and_special_values_are_accepted():
    built = build(Ranged, {"count": 1, "share": 1, "rate": None, "steps": -1, "weights": [0], "open_top": 0}, "x")
    assert (built.count, built.share, built.rate, built.steps, built.weights) == (1, 1.0, None, -1, [0.0])
    assert build(Ranged, {"rate": 1e-9, "steps": 1, "share": 0}, "x").rate == 1e-9


def test_ranges_read_as_symbols_in_explain_and_as_words_in_errors():
    shown = {name: type_ for name, type_, _, _ in describe(Ranged)}
    assert shown == {
        "count": "int ≥ 1",
        "share": "float in [0, 1]",
        "rate": "float > 0 or null",
        "steps": "int ≥ 1 or -1 (no limit)",
        "weights": "list of float ≥ 0",
        "open_top": "float in [0, 1)",
    }
    assert Bounds(above=0, maximum=1).wording() == "above 0 and at most 1" and str(Bounds(above=0, maximum=1)) == (
        "in (0, 1]"
    )
    assert not Bounds(minimum=0).allows(math.nan)


@pytest.mark.parametrize(
    "bounds", [{"minimum": 0, "above": 0}, {"maximum": 1, "below": 1}, {"special": {-1: "no limit"}}]
)
def test_a_schema_that_contradicts_itself_is_a_bug_not_a_user_error(bounds):
    with pytest.raises(TypeError):
        setting(0, help="x", **bounds)


def test_settings_made_in_code_are_checked_too(tmp_path):
    from align.evaluation import EvalSettings

    with pytest.raises(AlignError, match=r"'samples' must be at least 1; got 0"):
        EvalSettings(samples=0)
    result = run_align(
        "eval", "--model", f"a={tmp_path}", "--reference", str(tmp_path), "--output", "o", "--samples", "0"
    )
    assert result.returncode == 2 and result.stderr == "error: 'samples' must be at least 1; got 0\n"


# ---------------------------------------------------------------------------------------- union arms


@dataclass
class WithData:
    data: str | list[str | DataSource] = setting(help="data")
    score: float | None = setting(None, help="a number or nothing", minimum=0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([{"dataset": "a", "wieght": 2}], "unknown key 's.data[0].wieght' (did you mean 'weight'?)"),
        (["a", {"dataset": "b", "weight": "heavy"}], "'s.data[1].weight' must be float; got 'heavy' (str)"),
        ({"dataset": "a", "wieght": 2}, "unknown key 's.data.wieght' (did you mean 'weight'?)"),
        ({"weight": 2}, "'s.data.dataset' is required"),
        ([3], "'s.data[0]' must be str or mapping; got 3 (int)"),
        (3, "'s.data' must be str or list of (str or mapping); got 3 (int)"),
    ],
)
def test_a_union_reports_the_error_of_the_arm_the_values_shape_selects(value, message):
    cls = WithData
    with pytest.raises(AlignError) as info:
        build(cls, {"data": value}, "s")
    assert str(info.value).startswith(message)


def test_a_single_mapping_where_a_list_of_them_fits_is_a_list_of_one():
    built = build(WithData, {"data": {"dataset": "a", "eval_size": 16}}, "s")
    assert built.data == [DataSource("a", eval_size=16.0)]


def test_an_optional_scalar_still_says_both_what_it_takes_and_its_range():
    cls = WithData
    with pytest.raises(AlignError, match=r"^'s.score' must be float or null; got 'high' \(str\)$"):
        build(cls, {"data": "a", "score": "high"}, "s")
    with pytest.raises(AlignError, match=r"^'s.score' must be at least 0; got -1.0$"):
        build(cls, {"data": "a", "score": -1}, "s")


def test_a_recipe_with_one_dataset_as_a_mapping_resolves_to_a_list(write_recipe):
    from align.plugin_manager import get_plugin_manager

    recipe = load_recipe(
        write_recipe("model: tiny-llama\nstages:\n  dpo:\n    data: {dataset: demo_pref, eval_size: 16}\n"),
        [],
        get_plugin_manager(),
    )
    assert recipe.to_plain()["stages"]["dpo"]["data"] == [
        {"dataset": "demo_pref", "format": None, "weight": 1.0, "eval_size": 16.0, "num_samples": None}
    ]


# -------------------------------------------------------------------------------------- duplicate keys


def test_anchors_aliases_and_merge_keys_are_not_duplicates(write_recipe):
    from align.plugin_manager import get_plugin_manager

    text = """
    model: tiny-llama
    stages:
      dpo: &dpo {data: demo_pref, max_steps: 5, beta: 0.1}
      dpo2:
        <<: *dpo
        plugin: dpo
        beta: 0.2
      dpo3: {<<: *dpo, plugin: dpo}
    """
    recipe = load_recipe(write_recipe(text), [], get_plugin_manager())
    assert [s.config.beta for s in recipe.stages.values()] == [0.1, 0.2, 0.1]


def test_a_key_written_twice_in_an_override_is_refused(write_recipe):
    from align.plugin_manager import get_plugin_manager

    path = write_recipe("model: tiny-llama\nstages:\n  dpo: {data: demo_pref}\n")
    with pytest.raises(AlignError) as info:
        load_recipe(path, ["stages.dpo.data={dataset: demo_pref, dataset: demo_sft}"], get_plugin_manager())
    assert str(info.value).startswith(
        "override 'stages.dpo.data={dataset: demo_pref, dataset: demo_sft}': key 'dataset' appears twice"
    )


def test_keys_that_differ_only_by_their_yaml_type_are_not_duplicates(write_recipe):
    from align.recipe import read_yaml

    path = write_recipe("a: {1: x, '1': y}\n")
    assert read_yaml(path) == {"a": {1: "x", "1": "y"}}


# ------------------------------------------------------------------------------------ owned trainer keys

OWNED = sorted(OWNED_OPTIONS) + ["hub_model_id", "hub_strategy", "push_to_hub_token", "bf16", "deepspeed", "local_rank"]


@pytest.mark.parametrize("key", OWNED)
def test_trainer_options_that_align_sets_are_refused_with_what_to_do_instead(write_recipe, key):
    from align.plugin_manager import get_plugin_manager

    path = write_recipe("model: tiny-llama\nstages:\n  sft: {data: demo_sft}\n")
    with pytest.raises(AlignError) as info:
        load_recipe(path, [f"stages.sft.{key}=1"], get_plugin_manager())
    error = info.value
    assert error.message.startswith(f"'stages.sft.{key}' cannot be set in a recipe: ")
    assert error.hint  # what to use instead


# ------------------------------------------------------------------------------------ plugins, exit codes


def test_plugins_lists_a_blocked_plugin_as_blocked_instead_of_crashing():
    result = run_align("plugins", "-p", "no:hh", "-p", "no:dpo")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "blocked -p no:hh" in lines["hh"] and "blocked -p no:dpo" in lines["dpo"]
    assert "dataset format: hh" not in result.stdout and "stage: dpo" not in result.stdout
    as_json = run_align("plugins", "--json", "-p", "no:hh")
    import json

    rows = {row["plugin"]: row for row in json.loads(as_json.stdout)}
    assert rows["hh"] == {
        "plugin": "hh",
        "version": None,
        "source": "blocked",
        "where": "-p no:hh",
        "hooks": [],
        "registers": {},
    }
    assert rows["sharegpt"]["registers"] == {"dataset format": ["sharegpt"]}


def test_a_recipe_using_a_blocked_plugin_is_refused_with_exit_2(write_recipe):
    result = run_align(
        "config", str(write_recipe("model: tiny-llama\nstages:\n  dpo: {data: demo_pref}\n")), "-p", "no:dpo"
    )
    assert result.returncode == 2 and "'stages.dpo' uses the stage plugin 'dpo', which no installed plugin" in (
        result.stderr
    )


def test_a_sigterm_interrupts_any_command_with_exit_130(monkeypatch, capsys):
    from align import cli

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(cli, "cmd_plugins", killed)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # if main installed nothing: fail, not die
    try:
        assert cli.main(["plugins"]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "interrupted\n"


def test_the_readme_lists_the_exit_codes():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    for status in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert status in section


@pytest.mark.parametrize(
    ("rows", "later", "message"),
    [
        (
            [{"instruction": "q", "output": "a"}, {"instruction": "q"}],
            "sft",
            "row 1: the column 'output' is missing",
        ),
        (
            [{"instruction": "q", "output": "a"}],
            "dpo",
            "holds conversations, but this stage trains on preferences",
        ),
        ([], "sft", "is empty"),
    ],
    ids=["malformed-row", "wrong-kind", "empty-file"],
)
def test_a_later_stages_bad_data_stops_the_run_before_the_first_stage_trains(tmp_path, rows, later, message):
    data = tmp_path / "later.json"
    data.write_text(json.dumps(rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: tiny-llama\nstages:\n  first: {{plugin: sft, data: demo_sft, max_steps: 2}}\n"
        f"  later: {{plugin: {later}, data: {data}}}\n"
    )
    result = run_align("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "first").exists()  # nothing trained
