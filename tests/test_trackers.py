"""Trackers (``report_to``): TensorBoard, MLflow, W&B and a third party's tracker get every stage's metrics,
as the metrics file has them.

Each built-in tracker is read back with its own reader: TensorBoard's ``EventAccumulator``, MLflow's
``MlflowClient``, and W&B's offline transaction log (``run-*.wandb``) decoded with W&B's own record schema.
The trackers of this module are a third party's: registered by a plugin, as any package would.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from align import AlignError, hookimpl
from align.artifacts import MANIFEST
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.runner import run_recipe
from align.schema import setting
from align.stage import Stage, StageContext
from align.trackers import ExperimentTracker, Tracker, TrackerRun, report_to_setting

# ---------------------------------------------------------------------------------------------- a stage


@dataclass
class StepsSettings:
    report_to: Tracker | list[Tracker] | None = report_to_setting()
    fail: bool = setting(False, help="Raise after logging the steps.")


class StepsStage(Stage):
    """A third party's stage without torch: logs three steps, then its closing metrics."""

    name = "steps"
    Config = StepsSettings

    def run(self, context: StageContext) -> dict[str, float]:
        for step in (1, 2, 3):
            context.log_metrics({"loss": 1.0 / step, "reward": 0.5 * step}, step=step)
        if context.config.fail:
            raise AlignError("the steps stage was told to fail")
        return {"loss": 0.25, "final": 7.0}  # "loss" again: closing metrics at the last step, beside step 3's


@hookimpl
def align_register_stages() -> list[Stage]:
    return [StepsStage()]


# ---------------------------------------------------------------------------------------------- trackers


class Rows(ExperimentTracker):
    """A third party's tracker: appends what it is given to ``RUN/rows.jsonl``."""

    name = "rows"

    def open(self, context, identity):
        return RowsRun(context.run_dir / "rows.jsonl", identity)


class RowsRun(TrackerRun):
    def __init__(self, path, identity):
        self.path = path
        self.write({"open": identity.name, "group": identity.group, "fingerprint": identity.fingerprint})

    def write(self, row):
        with self.path.open("a") as out:
            out.write(json.dumps(row) + "\n")

    def log(self, metrics, step):
        self.write({"step": step, **metrics})

    def close(self, status):
        self.write({"close": status})


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]


class Broken(ExperimentTracker):
    """Opens, then fails on every row: a tracking server that went away."""

    name = "broken"

    def open(self, context, identity):
        return BrokenRun()


class BrokenRun(TrackerRun):
    def log(self, metrics, step):
        raise ConnectionError("the tracking server went away")


class Refusing(ExperimentTracker):
    """A tracker with a bug: its open raises something that is no AlignError."""

    name = "refusing"

    def open(self, context, identity):
        raise RuntimeError("the client's session is closed")


class Absent(ExperimentTracker):
    """A tracker whose package is not installed."""

    name = "absent"
    distribution = "align-absent-tracker"


@hookimpl
def align_register_trackers() -> list[ExperimentTracker]:
    return [Rows(), Broken(), Refusing(), Absent()]


def steps_plugins():
    pm = get_plugin_manager()
    pm.add_plugin(sys.modules[__name__], "test-steps")
    return pm


def run_steps(tmp_path: Path, report_to: str, overrides=(), name="run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: tiny-llama\ndefaults: {{report_to: {report_to}}}\nstages:\n  a: {{plugin: steps}}\n")
    pm = steps_plugins()
    return run_recipe(load_recipe(path, list(overrides), pm), pm, run_dir=tmp_path / name)


@pytest.fixture
def trackers_env(tmp_path, monkeypatch):
    """W&B offline with its own folders in tmp_path; MLflow at align's default unless a test sets it."""
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(variable, "")  # so that the value align may set is undone after the test
        monkeypatch.delenv(variable)
    yield
    import wandb

    wandb.teardown()  # W&B reads its environment once per process: the next test's must count


# ---------------------------------------------------------------------------------------------- readers


def expected(run_dir: Path, stage: str) -> list[tuple[int, str, float]]:
    """(step, name, value) of every metric in the stage's metrics file; closing rows at the last step."""
    found, last = [], 0
    for line in (run_dir / "logs" / f"{stage}.metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("time")
        step = row.pop("step")
        step = last if step is None else step
        last = max(last, step)
        found += [(step, name, value) for name, value in row.items()]
    return found


def last_per_step(rows: list[tuple[int, str, float]]) -> dict[tuple[int, str], float]:
    """What a W&B history keeps: the last value of each metric at each step."""
    return {(step, name): value for step, name, value in rows}


def assert_same_in_float32(scalars: list[tuple[int, str, float]], rows: list[tuple[int, str, float]]) -> None:
    """TensorBoard keeps 32-bit floats: the same steps and names, and the values to float32's precision."""
    scalars, rows = sorted(scalars), sorted(rows)
    assert [(step, name) for step, name, _ in scalars] == [(step, name) for step, name, _ in rows]
    assert [value for *_, value in scalars] == pytest.approx([value for *_, value in rows], rel=1e-6)


def tensorboard(run_dir: Path, stage: str) -> tuple[list[tuple[int, str, float]], dict[str, str]]:
    """The scalars (step, tag, value) and the texts of a stage's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / stage), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = [(e.step, tag, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    return scalars, texts


def mlflow_runs(uri: str, experiment: str) -> dict[str, Any]:
    """run name → (run, [(step, key, value)]) in an MLflow store."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # what align does; the reader needs it too
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} at {uri}"
    runs = {}
    for run in client.search_runs([found.experiment_id]):
        history = [
            (m.step, key, m.value) for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)
        ]
        runs[run.info.run_name] = (run, history)
    return runs


def wandb_runs(folder: Path) -> dict[str, dict[str, Any]]:
    """display name → {config, history: [(step, key, value)]} of every offline W&B run under ``folder``.

    A ``run-*.wandb`` file is W&B's transaction log: a 7-byte header, then LevelDB-style log records (32 KiB
    blocks; each chunk a CRC, a length and a type: whole, first, middle or last), each a W&B ``Record``.
    """
    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending, records = path.read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                records.append(pending)
        run: dict[str, Any] = {"config": {}, "history": []}
        for raw in records:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["group"] = record.run.display_name, record.run.run_group
                run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                step = record.history.step.num
                run["history"] += [(step, k, v) for k, v in items.items() if not k.startswith("_")]
        runs[run["name"]] = run
    return runs


# ---------------------------------------------------------------------------------------------- real stages

CHAIN = """
model: tiny-llama
defaults:
  report_to: [tensorboard, mlflow, wandb]
stages:
  sft:
    data: demo_sft
    max_steps: 4
    batch_size: 4
    logging_steps: 2
    max_length: 128
    save_steps: 0
  grpo:
    data: demo_prompts
    reward_functions: [sentiment]
    steps: 3
    batch_size: 2
    num_generations: 2
    max_new_tokens: 4
    save_steps: 0
  eval:
    samples: 4
    max_new_tokens: 4
"""


@pytest.mark.slow
def test_every_tracker_gets_a_trl_an_rl_and_the_eval_stages_metrics_as_the_metrics_file_has_them(
    tmp_path, trackers_env, monkeypatch
):
    store = tmp_path / "mlflow-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    path = tmp_path / "chain.yaml"
    path.write_text(CHAIN)
    pm = get_plugin_manager()
    run_dir = tmp_path / "chain"
    summary = run_recipe(load_recipe(path, [], pm), pm, run_dir=run_dir)
    assert summary.status == "done", summary.error
    recipe_text = (run_dir / "recipe.yaml").read_text()
    mlflow = mlflow_runs(store.as_uri(), "chain")  # the experiment: the run folder's name
    wandb = wandb_runs(run_dir)  # under the run folder by default
    assert sorted(mlflow) == sorted(wandb) == ["chain/eval", "chain/grpo", "chain/sft"]
    for stage in ("sft", "grpo", "eval"):
        rows = expected(run_dir, stage)
        assert rows, stage
        fingerprint = json.loads((run_dir / stage / MANIFEST).read_text())["fingerprint"]

        scalars, texts = tensorboard(run_dir, stage)
        assert_same_in_float32(scalars, rows)
        assert texts["run_name"] == f"chain/{stage}" and texts["fingerprint"] == fingerprint
        assert yaml.safe_load(texts["recipe"]) == yaml.safe_load(recipe_text)

        run, history = mlflow[f"chain/{stage}"]
        assert sorted(history) == sorted(rows), stage
        assert run.data.params["fingerprint"] == run.data.tags["align.fingerprint"] == fingerprint
        assert run.data.params["stage"] == stage and run.info.status == "FINISHED"
        from mlflow import MlflowClient

        local = MlflowClient(tracking_uri=store.as_uri()).download_artifacts(run.info.run_id, "recipe.yaml", tmp_path)
        assert Path(local).read_text() == recipe_text

        logged = wandb[f"chain/{stage}"]
        assert last_per_step(logged["history"]) == last_per_step(rows), stage
        assert logged["group"] == "chain" and logged["config"]["fingerprint"] == fingerprint
        assert logged["config"]["recipe"] == yaml.safe_load(recipe_text)

    steps = {step for step, *_ in expected(run_dir, "grpo")}
    assert steps == {1, 2, 3}  # each iteration of the loop, at its own step
    assert {step for step, *_ in expected(run_dir, "sft")} == {2, 4}  # logging_steps 2 of 4
    assert {step for step, *_ in expected(run_dir, "eval")} == {0}  # eval has no steps: its rows at 0


@pytest.mark.slow
def test_with_two_processes_one_reports(tmp_path, trackers_env):
    from conftest import run_align

    path = tmp_path / "ddp.yaml"
    path.write_text(
        "model: tiny-llama\nbackend: {kind: ddp, num_processes: 2}\n"
        "defaults: {report_to: [tensorboard, mlflow, wandb]}\n"
        "stages:\n  sft: {data: demo_sft, max_steps: 4, batch_size: 2, logging_steps: 2, max_length: 64}\n"
    )
    result = run_align("run", str(path), "--run-dir", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    assert len(list((run_dir / "tensorboard" / "sft").glob("events.out.tfevents.*"))) == 1
    scalars, _ = tensorboard(run_dir, "sft")
    assert_same_in_float32(scalars, expected(run_dir, "sft"))  # each row once
    assert list(mlflow_runs((run_dir / "mlruns").as_uri(), "ddp")) == ["ddp/sft"]
    assert list(wandb_runs(run_dir)) == ["ddp/sft"]


# ---------------------------------------------------------------------------------------------- quick


def test_each_tracker_writes_where_the_readme_says_by_default(tmp_path, trackers_env):
    summary = run_steps(tmp_path, "[tensorboard, mlflow, wandb]")
    assert summary.status == "done", summary.error
    run_dir = tmp_path / "run"
    rows = expected(run_dir, "a")
    assert rows == [(1, "loss", 1.0), (1, "reward", 0.5), (2, "loss", 0.5), (2, "reward", 1.0)] + [
        (3, "loss", 1 / 3),
        (3, "reward", 1.5),
        (3, "loss", 0.25),  # the closing metrics, at the last step
        (3, "final", 7.0),
    ]
    scalars, _ = tensorboard(run_dir, "a")
    assert_same_in_float32(scalars, rows)
    run, history = mlflow_runs((run_dir / "mlruns").as_uri(), "run")["run/a"]
    assert sorted(history) == sorted(rows)
    assert last_per_step(wandb_runs(run_dir)["run/a"]["history"]) == last_per_step(rows)


def test_wandb_dir_and_mlflow_tracking_uri_move_them(tmp_path, trackers_env, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    summary = run_steps(tmp_path, "[mlflow, wandb]")
    assert summary.status == "done", summary.error
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "run" / "mlruns").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()  # not asked for
    assert "run/a" in wandb_runs(tmp_path / "elsewhere")
    assert "run/a" in mlflow_runs((tmp_path / "store").as_uri(), "mine")


def test_report_to_none_writes_nothing_and_changing_it_trains_nothing_again(tmp_path, trackers_env):
    summary = run_steps(tmp_path, "none")
    assert summary.status == "done", summary.error
    run_dir = tmp_path / "run"
    assert not [p for p in ("tensorboard", "mlruns", "wandb") if (run_dir / p).exists()]
    assert (run_dir / "logs" / "a.metrics.jsonl").is_file()  # align's own record stays

    again = run_steps(tmp_path, "tensorboard")
    assert again.stages["a"].status == "cached"  # report_to is not part of the fingerprint


def test_a_stage_that_fails_ends_its_runs_as_failed(tmp_path, trackers_env):
    summary = run_steps(tmp_path, "[mlflow, tensorboard]", ["stages.a.fail=true"])
    assert summary.status == "failed"
    run, history = mlflow_runs((tmp_path / "run" / "mlruns").as_uri(), "run")["run/a"]
    assert run.info.status == "FAILED"
    assert sorted(history) == sorted(expected(tmp_path / "run", "a"))  # the steps before the failure


def test_a_tracker_that_breaks_mid_stage_is_dropped_and_the_stage_goes_on(tmp_path, trackers_env, caplog):
    summary = run_steps(tmp_path, "[broken, tensorboard]")
    assert summary.status == "done", summary.error
    assert "broken stopped reporting: the tracking server went away" in caplog.text
    scalars, _ = tensorboard(tmp_path / "run", "a")
    assert len(scalars) == len(expected(tmp_path / "run", "a"))  # the other tracker got every row


def test_only_the_first_process_reports(tmp_path, trackers_env, monkeypatch):
    import align.trackers

    monkeypatch.setattr(align.trackers, "is_rank_zero", lambda: False)
    summary = run_steps(tmp_path, "[tensorboard, mlflow, wandb, rows]")
    assert summary.status == "done", summary.error
    assert not [p for p in ("tensorboard", "mlruns", "wandb", "rows.jsonl") if (tmp_path / "run" / p).exists()]


def test_another_machines_first_process_reports_nothing(tmp_path, monkeypatch):
    """With run folders of their own, each machine's first process is a main process: only rank 0 reports,
    or W&B and a shared MLflow server would get one run of the same name per machine."""
    from align import backend
    from align.trackers import tracking

    pm = steps_plugins()
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-llama\ndefaults: {report_to: rows}\nstages:\n  a: {plugin: steps}\n")
    recipe = load_recipe(path, [], pm)
    spec = recipe.stages["a"]
    context = StageContext(
        "a", spec.stage, spec.config, {}, tmp_path / "work", tmp_path / "run", recipe, pm, logging.getLogger("align.a")
    )
    monkeypatch.setenv("RANK", "2")  # machine 1's first process, of two processes per machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(backend, "_own_run_folders", True)
    assert backend.is_main_process() and not backend.is_rank_zero()
    with tracking(context, "fp"):
        context.log_metrics({"loss": 1.0}, step=1)
    assert (tmp_path / "run" / "logs" / "a.metrics.jsonl").is_file()  # its own run folder's record
    assert not (tmp_path / "run" / "rows.jsonl").exists()

    monkeypatch.setenv("RANK", "0")
    with tracking(context, "fp"):
        context.log_metrics({"loss": 1.0}, step=1)
    assert rows_of(tmp_path / "run") == [
        {"open": "run/a", "group": "run", "fingerprint": "fp"},
        {"step": 1, "loss": 1.0},
        {"close": "finished"},
    ]


def test_a_tracker_that_cannot_start_fails_the_stage_saying_how_to_fix_it(tmp_path, trackers_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # online, and not logged in
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    summary = run_steps(tmp_path, "wandb", name="online")
    assert summary.stages["a"].error == (
        "tracker 'wandb': could not start a run: No API key configured. Use `wandb login` to log in.\n"
        f"  hint: log in (`wandb login`), or set WANDB_MODE=offline to keep the run in {tmp_path / 'online' / 'wandb'} "
        "and `wandb sync` it later"
    )
    assert not (tmp_path / "online" / "logs" / "a.metrics.jsonl").exists()  # before the stage did any work

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    summary = run_steps(tmp_path, "mlflow", name="mlflow")
    assert summary.stages["a"].error.startswith("tracker 'mlflow': could not start a run at bogus://nowhere: ")
    assert summary.stages["a"].error.endswith(
        "hint: check MLFLOW_TRACKING_URI (unset, align keeps a file store in the run folder)"
    )


def test_a_trl_stage_names_its_trainer_run_after_the_stage(tmp_path):
    from align.training import trainer_config, trl_class

    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-llama\nstages:\n  tune: {plugin: sft, data: demo_sft}\n")
    pm = get_plugin_manager()
    recipe = load_recipe(path, [], pm)
    spec = recipe.stages["tune"]
    context = StageContext(
        "tune", spec.stage, spec.config, {}, tmp_path / "work", tmp_path / "myrun", recipe, pm, None, spec.peft
    )
    args = trainer_config(trl_class("SFTConfig"), context)
    assert args.run_name == "myrun/tune" and args.report_to == []  # align reports the trainer's logs itself


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorbord", "'stages.sft.report_to': unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
        ("[mlflow, wandbb]", "'stages.sft.report_to[1]': unknown tracker 'wandbb' (did you mean 'wandb'?)"),
        ("nnone", "'stages.sft.report_to': unknown tracker 'nnone' (did you mean 'none'?)"),
        ("[none, wandb]", "'stages.sft.report_to' lists none beside other trackers"),
        ("7", "'stages.sft.report_to' must be str or list of str; got 7 (int)"),
    ],
)
def test_a_bad_report_to_is_refused_when_the_recipe_loads(tmp_path, value, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: tiny-llama\nstages:\n  sft: {{data: demo_sft, report_to: {value}}}\n")
    with pytest.raises(AlignError) as error:
        load_recipe(path, [], get_plugin_manager())
    assert error.value.message.replace(" or null", "") == message  # whether the stage's setting says `| None`


def test_a_stage_whose_settings_lack_report_to_follows_defaults_else_tensorboard(tmp_path, monkeypatch):
    from conftest import FAKE_PLUGIN

    pm = get_plugin_manager(plugins_dir=FAKE_PLUGIN.parent)  # its `count` stage has no report_to setting
    pm.add_plugin(sys.modules[__name__], "test-steps")
    path = tmp_path / "r.yaml"
    path.write_text("model: fake-model\nstages:\n  a: {plugin: count}\n")
    assert run_recipe(load_recipe(path, [], pm), pm, run_dir=tmp_path / "run").status == "done"
    scalars, _ = tensorboard(tmp_path / "run", "a")
    assert scalars == [(1, "value", 1.0), (1, "value", 1.0)]  # its step, then its closing metrics there

    path.write_text(
        "model: fake-model\ndefaults: {report_to: mlflow}\nstages:\n  a: {plugin: count}\n  b: {plugin: steps}\n"
    )
    monkeypatch.setattr(type(pm.get("tracker", "mlflow")), "module", "not_installed_here")
    with pytest.raises(AlignError, match=r"^'defaults.report_to' asks for mlflow, but the mlflow-skinny package"):
        load_recipe(path, [], pm)


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_whose_package_is_missing_is_refused_with_the_pip_command(tmp_path, monkeypatch, tracker):
    pm = get_plugin_manager()
    monkeypatch.setattr(type(pm.get("tracker", tracker)), "module", "not_installed_here")
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: tiny-llama\ndefaults: {{report_to: [tensorboard, {tracker}]}}\nstages:\n  sft: {{data: demo_sft}}\n"
    )
    with pytest.raises(AlignError) as error:
        load_recipe(path, [], pm)
    distribution = {"mlflow": "mlflow-skinny", "wandb": "wandb"}[tracker]
    assert error.value.message == (
        f"'stages.sft.report_to' asks for {tracker}, but the {distribution} package is not installed"
    )
    assert error.value.hint == f"pip install {distribution}, or leave {tracker} out"


def test_a_third_party_tracker_whose_package_is_missing_is_refused(tmp_path):
    with pytest.raises(AlignError) as error:
        run_steps(tmp_path, "[rows, absent]")
    assert error.value.message == (
        "'stages.a.report_to' asks for absent, but the align-absent-tracker package is not installed"
    )
    assert not (tmp_path / "run").exists()  # refused when the recipe loads, before any stage


# ---------------------------------------------------------------------------------------------- third parties


def test_a_third_party_tracker_gets_every_row_with_the_run_identity(tmp_path, trackers_env):
    summary = run_steps(tmp_path, "[rows, tensorboard]")
    assert summary.status == "done", summary.error
    run_dir = tmp_path / "run"
    fingerprint = json.loads((run_dir / "a" / MANIFEST).read_text())["fingerprint"]
    opened, *logged, closed = rows_of(run_dir)
    assert opened == {"open": "run/a", "group": "run", "fingerprint": fingerprint}
    rows = [(row["step"], name, value) for row in logged for name, value in row.items() if name != "step"]
    assert rows == expected(run_dir, "a")  # the closing metrics at the last step, as the other trackers get them
    assert closed == {"close": "finished"}
    assert_same_in_float32(tensorboard(run_dir, "a")[0], expected(run_dir, "a"))  # beside the built-in one


def test_an_unknown_tracker_is_refused_with_the_nearest_registered_name(tmp_path):
    with pytest.raises(AlignError) as error:
        run_steps(tmp_path, "[tensorboard, rowz]")  # `rows` is this test plugin's: the registry's, not a list's
    assert error.value.message == "'stages.a.report_to[1]': unknown tracker 'rowz' (did you mean 'rows'?)"
    assert error.value.hint.startswith(
        "installed trackers: absent, broken, mlflow, refusing, rows, tensorboard, wandb, or none;"
    )


def test_a_tracker_whose_open_raises_anything_stops_the_stage_naming_it(tmp_path, trackers_env):
    summary = run_steps(tmp_path, "[rows, refusing]")
    assert summary.stages["a"].status == "failed"
    assert summary.stages["a"].error == (
        "tracker 'refusing' could not start a run: RuntimeError: the client's session is closed\n"
        "  hint: leave refusing out of report_to to run without it; the metrics file keeps every row"
    )
    assert rows_of(tmp_path / "run")[-1] == {"close": "failed"}  # the tracker opened before it is closed
    assert not (tmp_path / "run" / "logs" / "a.metrics.jsonl").exists()  # before the stage did any work


def test_defaults_report_to_is_taken_with_only_stages_that_lack_the_setting(tmp_path):
    from conftest import FAKE_PLUGIN

    pm = get_plugin_manager(plugins_dir=FAKE_PLUGIN.parent)  # its `count` stage has no report_to setting
    path = tmp_path / "r.yaml"
    path.write_text("model: fake-model\ndefaults: {report_to: none}\nstages:\n  a: {plugin: count}\n")
    summary = run_recipe(load_recipe(path, [], pm), pm, run_dir=tmp_path / "run")
    assert summary.status == "done", summary.error
    assert (tmp_path / "run" / "logs" / "a.metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()  # none: not even the default

    path.write_text("model: fake-model\ndefaults: {report_to: tensorbord}\nstages:\n  a: {plugin: count}\n")
    with pytest.raises(AlignError, match=r"^'defaults.report_to': unknown tracker 'tensorbord' \(did you mean"):
        load_recipe(path, [], pm)
    path.write_text("model: fake-model\ndefaults: {report_tu: none}\nstages:\n  a: {plugin: count}\n")
    with pytest.raises(AlignError, match=r"^'defaults.report_tu' is not a setting .* \(did you mean 'report_to'\?\)"):
        load_recipe(path, [], pm)
