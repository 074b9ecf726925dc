"""Plugin discovery: entry points, -p, --plugins-dir, and the errors a broken plugin gives."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from align import AlignError
from align.plugin_manager import get_plugin_manager
from conftest import FAKE_PLUGIN, run_align

STAGE_PLUGIN = """
from dataclasses import dataclass
from align import hookimpl
from align.stage import Stage

@dataclass
class Settings:
    pass

class {cls}(Stage):
    name = "{stage}"
    Config = Settings

@hookimpl
def align_register_stages():
    return [{cls}()]
"""

HOOK = """
from align import hookimpl

@hookimpl
def {hook}():
    return {result}
"""


def write_module(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


def fake_distribution(folder: Path, dist: str, entry: str, module: str, body: str) -> None:
    """An installed package as importlib.metadata sees one: a dist-info folder and a module."""
    info = folder / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[align]\n{entry} = {module}\n")
    write_module(folder, module, body)


def test_builtins_are_found_through_the_entry_point_group():
    pm = get_plugin_manager()
    assert pm.registry("stage")["sft"].plugin == "sft"
    assert {"path", "tiny-llama"} <= set(pm.registry("model source"))
    assert str(pm.origins["sft"]).startswith("entry point align ")


def test_a_third_party_entry_point_is_loaded_with_its_distribution(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "align-thing", "thing", "align_thing", STAGE_PLUGIN.format(cls="T", stage="thing"))
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager()
    assert pm.registry("stage")["thing"].plugin == "thing"
    assert str(pm.origins["thing"]) == "entry point align-thing 1.2.3"


def test_autoload_can_be_switched_off_for_third_party_plugins(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "align-thing", "thing", "align_thing", STAGE_PLUGIN.format(cls="T", stage="thing"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager()
    assert "thing" not in pm.registry("stage") and "sft" in pm.registry("stage")


def test_a_plugin_that_fails_to_import_stops_everything_naming_it(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "align-broken", "broken", "align_broken", "import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AlignError) as info:
        get_plugin_manager()
    message = str(info.value)
    assert "plugin 'broken' (from align-broken, align_broken) failed to import" in message
    assert "ModuleNotFoundError: No module named 'does_not_exist_anywhere'" in message
    assert "align_broken.py:1" in message
    assert "-p no:broken" in message


def test_a_broken_plugin_can_be_blocked(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "align-broken", "broken", "align_broken", "raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(["no:broken"])
    assert "sft" in pm.registry("stage")


def test_a_module_given_with_p_is_loaded(tmp_path, monkeypatch):
    write_module(tmp_path, "my_stage_plugin", STAGE_PLUGIN.format(cls="Mine", stage="mine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(["my_stage_plugin"])
    assert pm.registry("stage")["mine"].plugin == "my_stage_plugin"
    assert pm.origins["my_stage_plugin"].source == "-p"


def test_a_missing_p_module_says_where_it_was_looked_for():
    with pytest.raises(AlignError, match="plugin module 'no_such_plugin_here' \\(-p\\) was not found"):
        get_plugin_manager(["no_such_plugin_here"])


def test_a_p_module_with_a_broken_import_names_the_real_error(tmp_path, monkeypatch):
    write_module(tmp_path, "half_broken", "import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AlignError, match="'half_broken' \\(-p\\) failed to import: ModuleNotFoundError"):
        get_plugin_manager(["half_broken"])


def test_every_py_file_in_plugins_dir_is_loaded(tmp_path):
    write_module(tmp_path, "one", STAGE_PLUGIN.format(cls="One", stage="one"))
    write_module(tmp_path, "two", STAGE_PLUGIN.format(cls="Two", stage="two"))
    write_module(tmp_path, "_private", "raise RuntimeError('not a plugin')\n")
    pm = get_plugin_manager(plugins_dir=tmp_path)
    assert {"one", "two"} <= set(pm.registry("stage"))
    assert pm.origins["one"].where == str(tmp_path / "one.py")


def test_a_missing_plugins_dir_is_an_error(tmp_path):
    with pytest.raises(AlignError, match="no such folder"):
        get_plugin_manager(plugins_dir=tmp_path / "nope")


def test_a_plugins_dir_file_that_raises_is_named(tmp_path):
    write_module(tmp_path, "bad", "x = 1 / 0\n")
    with pytest.raises(AlignError, match=r"plugin file .*bad.py failed to import: ZeroDivisionError"):
        get_plugin_manager(plugins_dir=tmp_path)


def test_two_plugins_registering_one_name_is_an_error_naming_both(tmp_path):
    write_module(tmp_path, "mine", STAGE_PLUGIN.format(cls="Sft", stage="sft"))
    pm = get_plugin_manager(plugins_dir=tmp_path)
    with pytest.raises(AlignError) as info:
        pm.registry("stage")
    message = str(info.value)
    assert "two plugins register the stage 'sft'" in message
    assert "'sft' (entry point align" in message and f"'mine' (plugins-dir {tmp_path / 'mine.py'})" in message


def test_a_hook_name_typo_is_an_error_with_a_suggestion(tmp_path):
    write_module(tmp_path, "typo", HOOK.format(hook="align_register_stage", result="[]"))
    with pytest.raises(AlignError) as info:
        get_plugin_manager(plugins_dir=tmp_path)
    assert "plugin 'typo'" in str(info.value) and "did you mean 'align_register_stages'" in str(info.value)


def test_a_registered_object_needs_a_name(tmp_path):
    write_module(tmp_path, "nameless", HOOK.format(hook="align_register_stages", result="[object()]"))
    pm = get_plugin_manager(plugins_dir=tmp_path)
    with pytest.raises(AlignError, match="plugin 'nameless' registers a stage without a `name`"):
        pm.registry("stage")


def test_align_plugins_lists_each_plugin_with_what_it_registers():
    result = run_align("plugins", "--plugins-dir", str(FAKE_PLUGIN.parent))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PLUGIN", "VERSION", "FROM", "REGISTERS"]  # -v adds the hooks
    sft = next(line for line in lines if line.startswith("sft "))
    assert "entry point align" in sft and "stage: sft" in sft
    fake = next(line for line in lines if line.startswith("fake_stages "))
    assert "plugins-dir" in fake and "stage: count, pair" in fake
    detail = run_align("plugins", "-v", "--plugins-dir", str(FAKE_PLUGIN.parent)).stdout
    blocks = {block.split()[0]: block for block in detail.split("\n\n")}
    assert "hooks      align_register_stages" in blocks["sft"]
    assert "stage: count, pair; model source: fake-model" in blocks["fake_stages"]


def test_align_plugins_json_is_machine_readable():
    result = run_align("plugins", "--json")
    rows = {row["plugin"]: row for row in json.loads(result.stdout)}
    assert rows["model_sources"]["registers"] == {"model source": ["path", "tiny-llama"]}
    assert rows["model_sources"]["hooks"] == ["align_register_model_sources"]
    assert rows["sft"]["source"] == "entry point" and rows["sft"]["where"] == "align"


def test_a_broken_plugin_stops_the_cli_without_a_traceback(tmp_path):
    write_module(tmp_path, "bad", "import not_installed_dependency\n")
    result = run_align("plugins", "--plugins-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: plugin file") and "Traceback" not in result.stderr
