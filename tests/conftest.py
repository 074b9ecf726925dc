"""Shared fixtures. Every test runs offline, on the CPU, with caches in temporary folders."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTERNAL = REPO.parent / "shared" / "external"
LLAMA_FACTORY = EXTERNAL / "llama-factory" / "data"
#: For tests that read third-party files: they skip in a clone without ../shared beside it.
needs_external = pytest.mark.skipif(not EXTERNAL.is_dir(), reason="../shared/external is not present")
FAKE_PLUGIN = Path(__file__).parent / "plugins" / "fake_stages.py"


@pytest.fixture(scope="session", autouse=True)
def offline_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No hub access, and caches that start empty; the tiny model is built once per session."""
    home = tmp_path_factory.mktemp("align_home")
    saved = dict(os.environ)
    os.environ.update(
        ALIGN_HOME=str(home),
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    yield home
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    """Write a recipe from an indented YAML string; returns its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def fake_pm():  # -> AlignPluginManager with the quick, torch-free test stages of tests/plugins
    from align.plugin_manager import get_plugin_manager

    return get_plugin_manager(plugins_dir=FAKE_PLUGIN.parent)


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's quickstart, run once for the whole session; returns its run folder."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_align("run", str(REPO / "examples" / "quickstart.yaml"), "--run-dir", str(run_dir), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    # What the user saw, for the tests of the terminal (test_console.py); beside the run folder, not in it.
    (run_dir.parent / "terminal.txt").write_text(result.stderr + result.stdout, encoding="utf-8")
    return run_dir


#: The multi-process backends that run on a CPU, for tests that train on two processes.
TWO_PROCESS_BACKENDS = pytest.mark.parametrize(
    "backend",
    [
        "{kind: ddp, num_processes: 2}",
        "{kind: deepspeed, num_processes: 2, zero_stage: 2}",
        "{kind: deepspeed, num_processes: 2, zero_stage: 3}",
    ],
    ids=["ddp", "zero2", "zero3"],
)


def tiny_llama() -> Path:
    """The default tiny-llama's folder (the base model of recipes that say `model: tiny-llama`)."""
    from align.plugin_manager import get_plugin_manager
    from align.runner import align_home
    from align.schema import build

    source = get_plugin_manager().get("model source", "tiny-llama")
    return Path(source.materialize(build(source.Config, {}, "model"), align_home() / "models"))


def run_align(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    """Run the installed ``align`` command in a fresh interpreter, as a user would."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
