"""Runs: caching by fingerprint, --force, atomic outputs, failures that lose nothing, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align import AlignError
from align.artifacts import MANIFEST
from align.recipe import load_recipe
from align.runner import run_recipe

CHAIN = """
model: fake-model
stages:
  first:
    plugin: count
    value: 2
  second:
    plugin: count
    policy: first
"""


def run(path: Path, pm, overrides=(), **kwargs):
    recipe = load_recipe(path, list(overrides), pm)
    return run_recipe(recipe, pm, run_dir=path.parent / "run", **kwargs)


def stages_run(path: Path) -> list[str]:
    log = path.parent / "run" / "runs.log"
    return log.read_text().split() if log.exists() else []


def value(run_dir: Path, stage: str) -> float:
    return json.loads((run_dir / stage / "value.json").read_text())["value"]


def test_a_run_publishes_each_stage_with_a_manifest_and_a_summary(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    summary = run(path, fake_pm)
    run_dir = path.parent / "run"
    assert summary.status == "done"
    assert value(run_dir, "second") == 3.0  # 2 from first, then 1 more
    manifest = json.loads((run_dir / "second" / MANIFEST).read_text())
    assert manifest["stage"] == "second" and manifest["plugin"] == "count"
    assert manifest["inputs"]["policy"]["producer"] == "first"
    assert manifest["tokenizer"]["tokenizer"]  # carried from the fake model
    assert manifest["metrics"] == {"value": 3.0}
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "done"
    assert {name: s["status"] for name, s in saved["stages"].items()} == {"first": "done", "second": "done"}
    assert saved["stages"]["second"]["metrics"] == {"value": 3.0}
    assert (run_dir / "recipe.yaml").read_text().startswith("model:")
    metrics = [json.loads(line) for line in (run_dir / "logs" / "first.metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and metrics[-1]["value"] == 2.0


def test_rerunning_an_unchanged_recipe_does_no_work(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm)
    summary = run(path, fake_pm)
    assert stages_run(path) == ["first", "second"]  # nothing ran the second time
    assert [s.status for s in summary.stages.values()] == ["cached", "cached"]
    assert summary.stages["second"].metrics == {"value": 3.0}


def test_a_changed_setting_reruns_that_stage_and_those_after_it(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm)
    summary = run(path, fake_pm, ["stages.first.value=10"])
    assert stages_run(path) == ["first", "second", "first", "second"]
    assert value(path.parent / "run", "second") == 11.0
    assert [s.status for s in summary.stages.values()] == ["done", "done"]


def test_a_change_downstream_leaves_upstream_cached(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm)
    run(path, fake_pm, ["stages.second.value=5"])
    assert stages_run(path) == ["first", "second", "second"]


def test_an_edited_data_file_reruns_the_stage(write_recipe, fake_pm):
    data = write_recipe("a\nb\n", name="data.txt")
    path = write_recipe(CHAIN.replace("value: 2", f"value: 2\n    data: {data}"))
    run(path, fake_pm)
    data.write_text("a\nb\nc\n")
    run(path, fake_pm)
    assert stages_run(path) == ["first", "second", "first", "second"]


def test_a_missing_data_file_fails_the_stage_naming_the_file(write_recipe, fake_pm, tmp_path):
    path = write_recipe(CHAIN.replace("value: 2", f"value: 2\n    data: {tmp_path / 'gone.txt'}"))
    summary = run(path, fake_pm)
    assert summary.status == "failed"
    assert "gone.txt does not exist" in summary.stages["first"].error


def test_force_reruns_a_cached_stage_and_everything_that_uses_it(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm)
    summary = run(path, fake_pm, force=["first"])
    assert stages_run(path) == ["first", "second", "first", "second"]
    assert [s.status for s in summary.stages.values()] == ["done", "done"]


def test_force_of_the_last_stage_reruns_only_it(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm)
    run(path, fake_pm, force=["second"])
    assert stages_run(path) == ["first", "second", "second"]


def test_force_of_an_unknown_stage_suggests_the_nearest(write_recipe, fake_pm):
    with pytest.raises(AlignError, match="no stage 'secnd' \\(did you mean 'second'\\?\\)"):
        run(write_recipe(CHAIN), fake_pm, force=["secnd"])


def test_a_failing_stage_leaves_no_half_written_output(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    summary = run(path, fake_pm, ["stages.second.fail=align"])
    run_dir = path.parent / "run"
    assert summary.status == "failed"
    assert summary.error == "stage 'second' failed: the fake stage was told to fail"
    assert not (run_dir / "second").exists()  # the stage wrote value.json, but nothing was published
    assert value(run_dir, "first") == 2.0  # the earlier artifact is intact
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "failed" and saved["stages"]["second"]["status"] == "failed"
    assert saved["stages"]["second"]["error"] == "the fake stage was told to fail"


def test_a_rerun_after_a_failure_starts_from_the_failed_stage(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm, ["stages.second.fail=align"])
    summary = run(path, fake_pm)  # the cause fixed
    assert stages_run(path) == ["first", "second", "second"]
    assert [s.status for s in summary.stages.values()] == ["cached", "done"]


def test_stages_after_a_failure_stay_pending(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    summary = run(path, fake_pm, ["stages.first.fail=align"])
    assert [s.status for s in summary.stages.values()] == ["failed", "pending"]


def test_the_work_folder_of_a_failed_stage_survives_for_resuming(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm, ["stages.second.fail=align"])
    work = list((path.parent / "run" / ".work").glob("second-*"))
    assert len(work) == 1 and (work[0] / "value.json").exists()


def test_a_bug_in_a_stage_is_reported_with_its_traceback_in_the_log(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    summary = run(path, fake_pm, ["stages.first.fail=bug"])
    assert summary.stages["first"].error == "ValueError: a bug in the fake stage"
    log = (path.parent / "run" / "logs" / "run.log").read_text()
    assert "Traceback" in log and "fake_stages.py" in log


def test_inputs_with_different_tokenizers_stop_the_stage_before_it_runs(write_recipe, fake_pm):
    text = """
    model: fake-model
    stages:
      a: {plugin: count}
      p: {plugin: pair, policy: a, reward_model: base}
    """
    path = write_recipe(text)
    assert run(path, fake_pm).status == "done"  # same tokenizer: fine

    # Swap a's tokenizer identity for another, as if it had been trained with a different tokenizer.
    manifest_file = path.parent / "run" / "a" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"]["tokenizer"] = "something-else"
    manifest_file.write_text(json.dumps(manifest))
    summary = run(path, fake_pm, force=["p"])
    assert summary.status == "failed"
    assert "use different tokenizers or chat templates" in summary.stages["p"].error


def test_a_stage_returning_something_other_than_metrics_fails_clearly(write_recipe, fake_pm):
    from align import hookimpl

    class Broken:
        @hookimpl
        def align_run_stage(self, context):
            return {"loss": "low"}

    fake_pm.add_plugin(Broken(), "broken")
    summary = run(write_recipe(CHAIN), fake_pm)
    assert "returns a mapping of metric name → number" in summary.stages["first"].error


def test_the_summary_records_each_stages_artifact(write_recipe, fake_pm):
    path = write_recipe(CHAIN)
    run(path, fake_pm)
    summary = run(path, fake_pm, force=["second"])  # first cached, second done
    saved = json.loads((path.parent / "run" / "summary.json").read_text())
    for stage in ("first", "second"):
        manifest = json.loads((path.parent / "run" / stage / MANIFEST).read_text())
        assert saved["stages"][stage]["artifact_id"] == manifest["artifact_id"] == summary.artifact_ids[stage]


def test_a_publish_that_fails_puts_the_earlier_output_back(tmp_path, monkeypatch):
    import os

    import align.artifacts
    from align.artifacts import publish

    final, work = tmp_path / "out", tmp_path / "work"
    final.mkdir()
    (final / "weights.bin").write_text("earlier")
    work.mkdir()
    (work / "weights.bin").write_text("new")
    replace = os.replace

    def failing(source, target):
        if Path(source) == work:
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(align.artifacts.os, "replace", failing)
    with pytest.raises(OSError):
        publish(work, final, {"stage": "out"})
    assert (final / "weights.bin").read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stale copy left
