"""The command line explains itself: help for every command and option, a table that fits a terminal,
-p no:NAME that says when NAME is wrong, and Tab completion that costs nothing until it is used."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from align.cli import TABLE_WIDTH, _fit_registers, _parser
from align.errors import AlignError
from align.plugin_manager import ESSENTIAL_PLUGINS, get_plugin_manager
from conftest import run_align


def commands(parser: argparse.ArgumentParser, path: str = "align") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser in the tree, nested subcommands included, with the command line that reaches it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def test_every_command_and_option_has_help_and_shows_its_default():
    missing = []
    for path, parser in commands(_parser()):
        if not parser.description:
            missing.append(f"{path}: no description")
        for action in parser._actions:
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{path} {command}: no help" for command in action.choices if command not in helped]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {name}: no help")
            elif action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in action.help:
                missing.append(f"{path} {name}: its help does not show its default {action.default!r}")
    assert not missing, "\n".join(missing)


def test_the_walk_reaches_nested_commands_and_the_eval_options():
    tree = dict(commands(_parser()))
    assert {"align run", "align data preview", "align config", "align explain", "align completion"} <= set(tree)
    options = {option for action in tree["align eval"]._actions for option in action.option_strings}
    assert {"--samples", "--max-new-tokens", "--temperature", "--seed", "--verbose"} <= options


@pytest.mark.parametrize("command", ["run", "plan", "config"])
def test_a_recipe_is_the_only_required_argument(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args([command])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "recipe [KEY=VALUE ...]" in err
    assert err.endswith(f"align {command}: error: the following arguments are required: recipe\n")
    assert _parser().parse_args([command, "r.yaml"]).overrides == []


def test_run_and_eval_take_verbose_and_report_takes_a_run_dir():
    parser = _parser()
    assert parser.parse_args(["run", "r.yaml", "-v"]).verbose is True
    assert parser.parse_args(["run", "r.yaml"]).verbose is False
    eval_args = ["eval", "--model", "m", "--reference", "r", "--output", "o"]
    assert parser.parse_args([*eval_args, "--verbose"]).verbose is True
    report = parser.parse_args(["report", "runs/chain"])
    assert report.run_dir == "runs/chain" and report.command.__name__ == "cmd_report"


def test_the_plugins_table_fits_100_columns_and_lists_every_plugin():
    result = run_align("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PLUGIN", "VERSION", "FROM", "REGISTERS"]  # the hooks are -v's
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, "\n".join(too_wide)
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == {row["plugin"] for row in json.loads(run_align("plugins", "--json").stdout)}
    evaluators = next(line for line in lines if line.startswith("evaluators "))
    assert "evaluator: reward_model, " in evaluators and " more" in evaluators  # cut, saying how many are left


def test_long_names_and_paths_still_fit(tmp_path):
    folder = tmp_path / ("a_folder_with_a_long_name_" * 4)
    folder.mkdir()
    (folder / "a_plugin_whose_file_name_goes_on_and_on.py").write_text(
        "from types import SimpleNamespace\nfrom align import hookimpl\n\n\n@hookimpl\n"
        "def align_register_reward_functions():\n"
        "    return [SimpleNamespace(name=f'a_reward_function_number_{i}') for i in range(20)]\n"
    )
    result = run_align("plugins", "--plugins-dir", str(folder))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("a_plugin_whose"))
    assert len(line) <= 100 and line.startswith("a_plugin_whose_file_nam… ") and line.endswith(" 20 reward functions")
    detail = run_align("plugins", "-v", "--plugins-dir", str(folder)).stdout
    assert "a_reward_function_number_19" in detail and str(folder) in detail  # -v cuts nothing


def test_fit_registers_shows_what_fits_then_how_many_more():
    registers = {"stage": ["alpha", "beta"], "advantage estimator": ["gamma", "delta", "epsilon"]}
    assert _fit_registers(registers, 100) == "stage: alpha, beta; advantage estimator: gamma, delta, epsilon"
    assert _fit_registers(registers, 40) == "stage: alpha, beta, +3 more"
    assert _fit_registers({}, 40) == "-"
    assert _fit_registers({"stage": ["x" * 80], "evaluator": ["y", "z"]}, 30) == "1 stage; 2 evaluators"
    many_kinds = _fit_registers({kind: ["x" * 80] for kind in "abcdefghijklmn"}, 30)
    assert len(many_kinds) == 30 and many_kinds.startswith("1 a; 1 b; ") and many_kinds.endswith("…")
    assert TABLE_WIDTH == 100


def test_plugins_verbose_shows_hooks_and_everything_registered():
    result = run_align("plugins", "-v")
    assert result.returncode == 0, result.stderr
    blocks = {block.split()[0]: block for block in result.stdout.split("\n\n")}
    assert "hooks      align_register_dataset_formats" in blocks["alpaca"]
    assert "from       entry point align (align.plugins.alpaca)" in blocks["alpaca"]
    assert "task_metrics" in blocks["evaluators"]  # the table cuts this list; -v does not
    assert "align_run_stage" in blocks["align.runner"]
    assert all(len(line) <= 100 for line in result.stdout.splitlines())


def test_p_no_blocks_an_entry_point_plugin():
    result = run_align("plugins", "-p", "no:alpaca")
    assert result.returncode == 0, result.stderr
    alpaca = next(line for line in result.stdout.splitlines() if line.startswith("alpaca "))
    assert "blocked -p no:alpaca" in alpaca
    assert "dataset format: alpaca" not in result.stdout
    assert "alpaca" not in get_plugin_manager(["no:alpaca"]).registry("dataset format")


def test_blocking_a_name_no_plugin_has_is_an_error_that_suggests_the_nearest():
    with pytest.raises(AlignError) as info:
        get_plugin_manager(["no:alpacca"])
    assert info.value.message == "-p no:alpacca: no plugin is named 'alpacca' (did you mean 'alpaca'?)"
    assert "align plugins" in (info.value.hint or "")
    with pytest.raises(AlignError, match="missing the name"):
        get_plugin_manager(["no:"])


def test_a_plugins_dir_file_can_be_blocked_by_its_name(tmp_path):
    (tmp_path / "mine.py").write_text("")
    pm = get_plugin_manager(["no:mine"], tmp_path)
    assert pm.get_plugin("mine") is None


@pytest.mark.parametrize("name", ESSENTIAL_PLUGINS)
def test_the_core_plugins_cannot_be_blocked(name):
    with pytest.raises(AlignError, match=f"'{name}' is part of align's core and cannot be blocked"):
        get_plugin_manager([f"no:{name}"])


@pytest.mark.parametrize(
    "argv",
    [
        ["plugins"],
        ["config", "recipe.yaml"],
        ["plan", "recipe.yaml"],
        ["run", "recipe.yaml"],
        ["explain", "sft"],
        ["data", "preview", "demo_sft"],
        ["eval", "--model", ".", "--reference", ".", "--output", "out"],
    ],
)
def test_every_command_that_takes_p_refuses_an_unknown_block(argv, tmp_path):
    result = run_align(*argv, "-p", "no:alpacca", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: -p no:alpacca: no plugin is named 'alpacca' (did you mean 'alpaca'?)")
    assert "Traceback" not in result.stderr


def complete(line: str, cwd: Path | None = None) -> list[str]:
    """What Tab offers after ``line``, asked the way the shell code of `align completion` asks."""
    handle, name = tempfile.mkstemp(suffix=".txt")
    os.close(handle)
    out = Path(name)
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }
    result = subprocess.run(
        [sys.executable, "-m", "align.cli"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    words = out.read_text()
    out.unlink()
    return [word.strip() for word in words.split("\n") if word.strip()]


def test_tab_completes_commands_and_options():
    assert complete("align ru") == ["run"]
    assert complete("align run --fo") == ["--force"]
    assert complete("align completion z") == ["zsh"]


def test_tab_completes_recipe_files_stage_names_and_plugin_names(write_recipe, tmp_path):
    write_recipe("model: tiny-llama\nstages:\n  sft: {data: demo_sft}\n  dpo: {data: demo_pref}\n", name="chain.yaml")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "configs").mkdir()
    assert [word for word in complete("align run ", cwd=tmp_path) if not word.startswith("-")] == [
        "chain.yaml",
        "configs/",
    ]
    assert complete("align run c", cwd=tmp_path) == ["chain.yaml", "configs/"]
    assert complete("align run chain.yaml --force ", cwd=tmp_path) == ["sft", "dpo"]
    assert complete("align run missing.yaml --force ", cwd=tmp_path) == []
    assert "simpo" in complete("align explain si")


def test_completion_prints_shell_code_for_each_shell():
    for shell in ("bash", "zsh", "fish"):
        result = run_align("completion", shell)
        assert result.returncode == 0, result.stderr
        assert "align" in result.stdout and "complete" in result.stdout.lower()
    assert "complete -o nospace -o default -o bashdefault -F _python_argcomplete align" in (
        run_align("completion", "bash").stdout
    )


def test_argcomplete_is_imported_only_while_completing():
    code = "import sys\nfrom align.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print('argcomplete' in sys.modules, 'yaml' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "False False"
    first_line = Path(sys.modules["align.cli"].__file__ or "").read_text().splitlines()[0]
    assert first_line == "# PYTHON_ARGCOMPLETE_OK"  # what global completion (activate-global-...) looks for
