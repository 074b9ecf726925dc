"""The command line: fast start, errors without tracebacks, exit codes a script can rely on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import FAKE_PLUGIN, REPO, run_align


def modules_imported_by(*argv: str) -> set[str]:
    code = (
        "import sys\nfrom align.cli import main\n"
        f"try:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.rpartition("MODULES ")[2].split())  # after the command's own output


def test_help_and_plugins_do_not_import_torch_or_transformers():
    for argv in (["--help"], ["plugins"], ["plugins", "--json"], ["explain", "sft"]):
        heavy = modules_imported_by(*argv) & {"torch", "transformers", "trl", "datasets", "deepspeed"}
        assert not heavy, f"align {' '.join(argv)} imports {heavy}"


def test_config_prints_the_resolved_recipe(write_recipe):
    recipe = write_recipe("model: fake-model\nstages:\n  a: {plugin: count}\n")
    result = run_align("config", str(recipe), "stages.a.value=3", "--plugins-dir", str(FAKE_PLUGIN.parent))
    assert result.returncode == 0, result.stderr
    assert "  a:\n    plugin: count\n    policy: base\n" in result.stdout
    assert "value: 3.0" in result.stdout


def test_config_errors_exit_2_without_a_traceback(write_recipe):
    recipe = write_recipe("model: fake-model\nstages:\n  a: {plugin: count, valeu: 3}\n")
    result = run_align("config", str(recipe), "--plugins-dir", str(FAKE_PLUGIN.parent))
    assert result.returncode == 2
    assert result.stderr == (
        "error: unknown key 'stages.a.valeu' (did you mean 'value'?)\n"
        "  hint: known keys here: plugin, policy, data, value, fail, learning_rate, mode, sleep\n"
    )


def test_a_failed_run_exits_1_and_points_at_the_log(write_recipe, tmp_path):
    recipe = write_recipe("model: fake-model\nstages:\n  a: {plugin: count, fail: bug}\n")
    result = run_align("run", str(recipe), "--run-dir", str(tmp_path / "run"), "--plugins-dir", str(FAKE_PLUGIN.parent))
    assert result.returncode == 1
    assert "[1/1] a: failed with ValueError: a bug in the fake stage" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"see {tmp_path / 'run'}/logs/run.log; rerunning continues from the failed stage" in result.stderr


def test_run_reports_progress_and_cached_stages(write_recipe, tmp_path):
    recipe = write_recipe("model: fake-model\nstages:\n  a: {plugin: count}\n  b: {plugin: count, policy: a}\n")
    args = ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--plugins-dir", str(FAKE_PLUGIN.parent)]
    first = run_align(*args)
    assert first.returncode == 0, first.stderr
    assert "[1/2] a: running (count)" in first.stderr and "[2/2] b: done in" in first.stderr
    again = run_align(*args, "--force", "b")
    assert "[1/2] a: cached" in again.stderr and "[2/2] b: running" in again.stderr
    assert f"done: {tmp_path / 'run'}/summary.json" in again.stdout


def test_run_dir_defaults_to_runs_slash_recipe_name(write_recipe, tmp_path):
    recipe = write_recipe("model: fake-model\nstages:\n  a: {plugin: count}\n", name="my-recipe.yaml")
    result = run_align("run", str(recipe), "--plugins-dir", str(FAKE_PLUGIN.parent), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "my-recipe" / "a" / "align-manifest.json").exists()


def test_explain_shows_a_stages_inputs_and_settings():
    result = run_align("explain", "sft")
    assert result.returncode == 0, result.stderr
    assert "policy  (input; default: the latest earlier stage producing a policy or base)" in result.stdout
    assert "learning_rate: float > 0 or null = None" in result.stdout  # with its range
    assert "Default: 2e-05 (TRL's SFTConfig); 0.0001 with an adapter method such as lora" in result.stdout


def test_explain_shows_both_a_stage_and_an_estimator_of_one_name_and_reward_function_options():
    result = run_align("explain", "grpo")
    assert result.returncode == 0, result.stderr
    assert "stage 'grpo'" in result.stdout and "num_generations: int ≥ 2 = 8" in result.stdout
    assert "advantage estimator 'grpo'" in result.stdout and "trains a critic: no" in result.stdout
    assert "scale_rewards: 'group' | 'batch' | 'none' = 'group'" in result.stdout
    result = run_align("explain", "exact_answer")
    assert result.returncode == 0 and "reward function 'exact_answer'" in result.stdout
    assert "column: str = 'answer'" in result.stdout


def test_no_command_prints_help_and_exits_2():
    result = run_align()
    assert result.returncode == 2 and "commands:" in result.stdout


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run must run what the README tells a user to run, not a shortcut."""
    listed = subprocess.run(
        ["bash", str(REPO / ".ci" / "run"), "--list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    readme = (REPO / "README.md").read_text()
    assert len(listed) == 2
    assert listed[0].endswith("align run examples/sft.yaml") or "align run examples/" in listed[0]
    assert "pytest" in listed[1]
    for command in listed:
        assert f"\n{command}\n" in readme


def test_a_killed_run_records_where_it_stopped_and_the_rerun_continues(write_recipe, tmp_path):
    recipe = write_recipe(
        "model: fake-model\nstages:\n  a: {plugin: count}\n  b: {plugin: count, policy: a, sleep: 30}\n"
    )
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir)]
    command += ["--plugins-dir", str(FAKE_PLUGIN.parent)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run_dir / "sleeping").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["stages"]["a"]["status"] == "done"
    assert summary["stages"]["b"] == {**summary["stages"]["b"], "status": "failed", "error": "interrupted"}
    assert not (run_dir / "b").exists()

    again = run_align(
        "run", str(recipe), "--run-dir", str(run_dir), "--plugins-dir", str(FAKE_PLUGIN.parent), "stages.b.sleep=0"
    )
    assert again.returncode == 0, again.stderr
    assert "[1/2] a: cached" in again.stderr and "[2/2] b: done" in again.stderr
